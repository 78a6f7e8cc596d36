"""Helpers shared by the tests that run the real `dnnr` CLI in subprocesses."""

import concurrent.futures
import importlib.util
import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

from tests.conftest import ROOT

TIMEOUT_S = 300


def load_script(name: str):
  """scripts/<name>.py imported as a module, to call its functions in-process."""
  spec = importlib.util.spec_from_file_location(name, ROOT / 'scripts' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run(*args) -> subprocess.CompletedProcess:
  """Runs one command from the repository root, capturing its output."""
  return subprocess.run(
      [str(arg) for arg in args], cwd=ROOT, capture_output=True, text=True,
      timeout=TIMEOUT_S, env=os.environ.copy())


def run_all(commands: dict) -> dict:
  """Runs independent commands side by side; results by the same keys."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    futures = {key: pool.submit(run, *args) for key, args in commands.items()}
    return {key: future.result() for key, future in futures.items()}


def one_json(result: subprocess.CompletedProcess) -> dict:
  """The one JSON object a successful `--json` run prints."""
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, result.stdout
  return json.loads(lines[0])


def snapshot(directory: pathlib.Path) -> dict:
  """Every file under `directory` with its mtime and bytes, to prove nothing changed."""
  return {str(f.relative_to(directory)): (f.stat().st_mtime_ns, f.read_bytes())
          for f in sorted(directory.rglob('*')) if f.is_file()}


def assert_one_line_error(result: subprocess.CompletedProcess, words) -> None:
  """Exit status 2, nothing on stdout, one `error:` line naming each of `words`."""
  assert result.returncode == 2, result.stderr
  assert result.stdout == ''
  assert 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: ')
  for word in words:
    assert word in lines[0]


def write_damaged_frames(path: pathlib.Path, final: pathlib.Path) -> None:
  """A 4-bit model of `final` whose coded frames were damaged before their digests were taken.

  Its digests match, so only the decoder can tell: a codec that fails to decode.
  """
  from dnnr_jax.compress.quantize import QuantSpec, quantize_params
  from dnnr_jax.io import checkpoint, entropy

  source = checkpoint.load_model(final)
  params = quantize_params(source.variables['params'], QuantSpec(bits=4))
  kept = {key: value for key, value in source.metadata.items()
          if key not in ('format', 'format_version', 'created', 'library_versions', 'layout',
                         'integrity')}
  encode = entropy.encode_frames

  def damaged(arrays):
    coded, lengths = encode(arrays)
    return coded ^ np.uint8(0xff), lengths

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(entropy, 'encode_frames', damaged)
    checkpoint.save_checkpoint(path, {**source.variables, 'params': params},
                               {**kept, 'kind': 'quantized'})
