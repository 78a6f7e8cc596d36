"""The package's layers: every import points down (or sideways), never up.

Layers, bottom first: `errors` and `config`; the pure library (`complexity`,
`cost`, `thresholds`, `routing`, `model`, `train`, `compress`); I/O (`io`); jobs
(`jobs`); the CLI. `compress` imports only itself, `config` and `errors`.
"""

import ast
import pathlib

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / 'dnnr_jax'
LAYERS = {
    'errors': 0, 'config': 0,
    'augment': 1, 'complexity': 1, 'cost': 1, 'thresholds': 1, 'routing': 1, 'model': 1, 'train': 1,
    'compress': 1, 'parallel': 1,
    'io': 2,
    'jobs': 3,
    'cli': 4, 'cli_models': 4, '__main__': 4,
}


def _top(module: str) -> str:
  """'dnnr_jax.io.checkpoint' -> 'io'."""
  return module.split('.')[1]


def _imports(path: pathlib.Path) -> list[str]:
  """Every dnnr_jax module `path` imports, function-level imports included."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('dnnr_jax'):
      if node.module == 'dnnr_jax':
        found.extend(f'dnnr_jax.{alias.name}' for alias in node.names)
      else:
        found.append(node.module)
    elif isinstance(node, ast.Import):
      found.extend(alias.name for alias in node.names if alias.name.startswith('dnnr_jax.'))
  return found


MODULES = sorted(path for path in PACKAGE.rglob('*.py') if path.name != '__init__.py'
                 or path.parent != PACKAGE)


@pytest.mark.parametrize('path', MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_only_look_down(path):
  module = '.'.join(('dnnr_jax', *path.relative_to(PACKAGE).with_suffix('').parts))
  own = _top(module)
  assert own in LAYERS, f'{module} is in no layer; add it to LAYERS'
  for imported in _imports(path):
    assert LAYERS[_top(imported)] <= LAYERS[own], f'{module} imports {imported}, a higher layer'
    if own == 'compress':
      assert _top(imported) in ('compress', 'config', 'errors'), (
          f'{module} imports {imported}; compress/ holds pure transforms only')


def test_a_wrong_import_is_caught(tmp_path):
  # The check above reads function-level imports too.
  source = tmp_path / 'm.py'
  source.write_text('def f():\n  from dnnr_jax.jobs import pipeline\n  import dnnr_jax.io.export\n')
  assert sorted(_imports(source)) == ['dnnr_jax.io.export', 'dnnr_jax.jobs']
