"""`dnnr models`: the models folder as a registry (list, show, diff, card, rm, gc).

Each subcommand is one call into `dnnr_jax.io.registry`, `model_details`,
`model_card` or `model_removal`, then printing. None of them imports JAX.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

from dnnr_jax.errors import DnnrError

# Rows are wide; without a terminal rich would wrap them at 80 columns.
_stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def add_parser(commands: argparse._SubParsersAction) -> None:
  """Adds `dnnr models` and its subcommands to the `dnnr` parser."""
  models = commands.add_parser(
      'models', help='list, show, compare, describe and remove the versions in a models folder',
      description='Without an ACTION: one row per checkpoint and ONNX export. REF is a path, '
                  'or kind:version such as quantized:1.0 (quantized:1.0.onnx for its export).')
  models.add_argument('--models-dir', default='models', help='default: %(default)s')
  models.add_argument('--json', action='store_true', help='print one JSON object')
  models.set_defaults(handler=_list)
  actions = models.add_subparsers(dest='models_command', metavar='[ACTION]')

  def action(name, handler, help_text):
    parser = actions.add_parser(name, help=help_text)
    # SUPPRESS: given after the action, these override those given before it; else kept.
    parser.add_argument('--models-dir', default=argparse.SUPPRESS, help='default: models')
    parser.add_argument('--json', action='store_true', default=argparse.SUPPRESS,
                        help='print one JSON object')
    parser.set_defaults(handler=handler)
    return parser

  action('show', _show, 'lineage, settings, metrics and files of one version').add_argument(
      'ref', metavar='REF', help='a path, or kind:version such as quantized:1.0 '
                                 '(quantized:1.0.onnx for its export)')
  diff = action('diff', _diff, 'two versions side by side, changes highlighted')
  diff.add_argument('left', metavar='A')
  diff.add_argument('right', metavar='B')
  diff.add_argument('--only-changed', action='store_true', help='leave out equal keys')
  action('card', _card, 'write the Markdown model card beside a checkpoint').add_argument(
      'ref', metavar='REF')
  rm = action('rm', _rm, 'remove a version (with its exports and card)')
  rm.add_argument('ref', metavar='REF')
  rm.add_argument('--force', action='store_true',
                  help='remove it even though other versions were made from it')
  rm.add_argument('--yes', action='store_true', help='do not ask')
  gc = action('gc', _gc, 'remove all but the newest N unreferenced versions of each kind')
  gc.add_argument('--keep', type=int, required=True, metavar='N')
  gc.add_argument('--yes', action='store_true', help='do not ask')


def _list(args: argparse.Namespace) -> int:
  from dnnr_jax.io import registry as registry_lib

  registry = registry_lib.scan(args.models_dir)
  if args.json:
    print(json.dumps({'models_dir': str(registry.root),
                      'entries': [entry.to_dict() for entry in registry.entries]}))
    return 0
  rows = [[entry.path.name if entry.path.name.startswith('.') else entry.ref,
           (entry.created or '').replace('T', ' ')[:16],
           _source(registry, entry), entry.dataset or '', _percent(entry.test_accuracy),
           _percent(entry.deep_fraction, 1), f'{entry.bytes:,}',
           '' if entry.smaller_than_root is None else f'{entry.smaller_than_root:.2f}',
           entry.state] for entry in registry.entries]
  exports = sum(entry.format == 'onnx' for entry in registry.entries)
  print(f'{registry.root}: {len(registry.entries) - exports} checkpoints, {exports} ONNX exports')
  _print_table(('ref', 'created', 'source', 'data', 'test acc', 'deep', 'bytes', '× smaller',
                'state'), rows, left=(0, 1, 2, 3, 8),
               highlight=[entry.state != 'ok' for entry in registry.entries])
  for entry in registry.entries:
    if entry.state != 'ok':
      print(f'{entry.path}: {entry.state}, {entry.problem}')
  return 0


def _show(args: argparse.Namespace) -> int:
  from dnnr_jax.io import model_details

  info = model_details.show(args.models_dir, args.ref)
  entry = info.entry
  if args.json:
    print(json.dumps({
        'entry': entry.to_dict(),
        'lineage': [{'ref': step.entry.ref, 'path': str(step.entry.path),
                     'settings': step.settings} for step in info.lineage],
        'derived': [child.ref for child in info.derived], 'metrics': info.metrics,
        'routes': info.routes, 'library_versions': info.library_versions,
        'files': {name: str(path) for name, path in info.files.items()}}, default=str))
    return 0
  _stdout.print(f'[bold]{entry.ref}[/] {entry.path} ({entry.state}'
                + (f': {entry.problem}' if entry.problem else '') + ')')
  ratio = ('' if entry.smaller_than_root is None else
           f', {entry.smaller_than_root:.2f}× smaller than {info.lineage[0].entry.ref}')
  _stdout.print(f'test accuracy {_percent(entry.test_accuracy) or "not measured"}, deep path '
                f'{_percent(entry.deep_fraction, 1) or "not measured"}, {entry.bytes:,} bytes'
                + ratio)
  _stdout.print('lineage: ' + ' → '.join(step.entry.ref for step in info.lineage))
  for step in info.lineage:
    title = 'training, where it differs from the defaults' if (
        step.entry.kind == 'final' and step.entry.format == 'orbax') else 'settings'
    _stdout.print(f'\n[bold]{step.entry.ref}[/] {title}:')
    for key, value in step.settings.items():
      _stdout.print(f'  {key}: {_value(value)}')
  metrics_title = 'metrics' if entry.format == 'orbax' else 'metrics of its checkpoint'
  sections = {metrics_title: info.metrics, 'per-route accuracy': info.routes,
              'library versions': info.library_versions,
              'files': {name: str(path) for name, path in info.files.items()},
              'made from it': {child.ref: str(child.path) for child in info.derived}}
  for title, values in sections.items():
    if values:
      _stdout.print(f'\n[bold]{title}:')
      for key, value in values.items():
        _stdout.print(f'  {key}: {_value(value)}')
  return 0


def _diff(args: argparse.Namespace) -> int:
  from dnnr_jax.io import model_details

  result = model_details.diff(args.models_dir, args.left, args.right)
  if args.json:
    print(json.dumps({'left': result.left.ref, 'right': result.right.ref,
                      'rows': [{'key': row.key, 'left': row.left, 'right': row.right,
                                'changed': row.changed} for row in result.rows]}, default=str))
    return 0
  rows = [row for row in result.rows if row.changed or not args.only_changed]
  print(f'{result.left.ref} vs {result.right.ref}: '
        f'{sum(row.changed for row in result.rows)} of {len(result.rows)} keys differ (*)')
  _print_table(('key', result.left.ref, result.right.ref),
               [[('* ' if row.changed else '  ') + row.key, _value(row.left), _value(row.right)]
                for row in rows], left=(0, 1, 2), highlight=[row.changed for row in rows])
  return 0


def _card(args: argparse.Namespace) -> int:
  from dnnr_jax.io import model_card

  path = model_card.write_card(args.models_dir, args.ref)
  print(json.dumps({'card': str(path)}) if args.json else f'wrote {path}')
  return 0


def _rm(args: argparse.Namespace) -> int:
  from dnnr_jax.io import model_removal

  _require_answer(args, 'rm')
  return _confirm_and_remove(
      args, model_removal.plan_rm(args.models_dir, args.ref, force=args.force))


def _gc(args: argparse.Namespace) -> int:
  from dnnr_jax.io import model_removal

  _require_answer(args, 'gc')
  return _confirm_and_remove(args, model_removal.plan_gc(args.models_dir, args.keep))


def _require_answer(args: argparse.Namespace, action: str) -> None:
  if not args.yes and not sys.stdin.isatty():
    raise DnnrError(f'dnnr models {action} asks before it removes anything and there is no '
                    'terminal to answer; pass --yes to remove without asking.')


def _confirm_and_remove(args: argparse.Namespace, removal) -> int:
  from dnnr_jax.io import model_removal

  if not removal.paths:
    print(json.dumps({'removed': []}) if args.json else 'nothing to remove')
    return 0
  if not args.json or not args.yes:
    for path in removal.paths:
      _stdout.print(f'remove {path}')
    for entry in removal.orphaned:
      _stdout.print(f'[yellow]{entry.ref} keeps working but loses its source')
  if not args.yes and input('remove these? [y/N] ').strip().lower() not in ('y', 'yes'):
    print('nothing removed')
    return 1
  model_removal.remove(removal)
  if args.json:
    print(json.dumps({'removed': [str(path) for path in removal.paths]}))
  else:
    _stdout.print(f'removed {len(removal.paths)} paths')
  return 0


def _print_table(headers, rows, *, left, highlight) -> None:
  """A plain aligned table (rich's takes seconds for a hundred rows); highlighted rows
  in bold yellow on a terminal."""
  widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
  bold, plain = ('\033[1;33m', '\033[0m') if sys.stdout.isatty() else ('', '')

  def line(cells):
    padded = (str(cell).ljust(width) if index in left else str(cell).rjust(width)
              for index, (cell, width) in enumerate(zip(cells, widths, strict=True)))
    return '  '.join(padded).rstrip()

  print(line(headers))
  print('  '.join('-' * width for width in widths))
  for cells, marked in zip(rows, highlight, strict=True):
    print(f'{bold}{line(cells)}{plain}' if marked else line(cells))


def _source(registry, entry) -> str:
  if entry.parent is None:
    return ''
  parent = registry.get(entry.parent)
  if parent is not None:
    return parent.ref
  return f'{entry.parent.name} (elsewhere)' if entry.parent.exists() else (
      f'{entry.parent.name} (missing)')


def _percent(value: float | None, digits: int = 2) -> str:
  return '' if value is None else f'{value:.{digits}%}'


def _value(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:.6g}'
  return '' if value is None else str(value)
