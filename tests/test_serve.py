"""`dnnr predict`: onnxruntime only, the same accuracy as `dnnr evaluate`."""

import gzip
import logging
import sys

import numpy as np
import pytest

from dnnr_jax.config import load_config
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import export
from dnnr_jax.io.data import _digits_arrays
from dnnr_jax.io.serve import predict_onnx
from dnnr_jax.jobs import train as jobs
from tests.cli_helpers import assert_one_line_error, one_json, run
from tests.conftest import SMOKE_CONFIG

logging.getLogger('onnx_ir').setLevel(logging.ERROR)


def _write_idx(path, array, magic):
  header = np.array([magic, *array.shape], '>u4').tobytes()
  with gzip.open(path, 'wb') as stream:
    stream.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope='module')
def served(tmp_path_factory):
  """A smoke model, its ONNX export, and the digits test split as IDX files."""
  root = tmp_path_factory.mktemp('serve')
  checkpoint, _ = jobs.train_and_save(
      load_config(SMOKE_CONFIG, ['training.epochs=2']), models_dir=root / 'models')
  onnx_file, _ = export.export_onnx(checkpoint, check_inputs=export.real_check_inputs(checkpoint))
  _, (images, labels) = _digits_arrays()
  _write_idx(root / 'images.gz', images.reshape(-1, 8, 8), 0x803)
  _write_idx(root / 'labels.gz', labels, 0x801)
  return checkpoint, onnx_file, root


def test_predict_matches_evaluate(served):
  checkpoint, onnx_file, root = served
  result = predict_onnx(onnx_file, root / 'images.gz', root / 'labels.gz', batch_size=100)
  expected = jobs.evaluate_checkpoint(checkpoint)
  assert result['n'] == expected['n'] == 360
  assert result['accuracy'] == pytest.approx(expected['accuracy'], abs=1e-9)
  assert result['deep_fraction'] == pytest.approx(expected['deep_fraction'], abs=1e-9)
  assert result['samples_per_second'] > 0
  without_labels = predict_onnx(onnx_file, root / 'images.gz', batch_size=7)
  assert 'accuracy' not in without_labels
  assert without_labels['predictions'] == result['predictions']


def test_cli_predict_never_imports_jax(served):
  _, onnx_file, root = served
  code = ('import sys, json; from dnnr_jax.cli import main; '
          f"status = main(['predict', {str(onnx_file)!r}, '--images', "
          f"{str(root / 'images.gz')!r}, '--labels', {str(root / 'labels.gz')!r}, '--json']); "
          "assert 'jax' not in sys.modules and 'flax' not in sys.modules, 'jax imported'; "
          'sys.exit(status)')
  summary = one_json(run(sys.executable, '-c', code))
  assert summary['n'] == 360 and 0.5 < summary['accuracy'] <= 1


def test_bad_inputs(served, tmp_path):
  _, onnx_file, root = served
  _write_idx(tmp_path / 'big.gz', np.zeros((3, 28, 28)), 0x803)
  _write_idx(tmp_path / 'few_labels.gz', np.zeros(5), 0x801)
  (tmp_path / 'not.onnx').write_bytes(b'not a model')
  cases = {
      'shape': ([onnx_file, '--images', tmp_path / 'big.gz'], ['28, 28']),
      'labels': ([onnx_file, '--images', root / 'images.gz', '--labels',
                  tmp_path / 'few_labels.gz'], ['5 labels for 360 images']),
      'missing': ([tmp_path / 'missing.onnx', '--images', root / 'images.gz'],
                  ['is not a file']),
      'not_onnx': ([tmp_path / 'not.onnx', '--images', root / 'images.gz'],
                   ['not a valid ONNX model']),
      'batch': ([onnx_file, '--images', root / 'images.gz', '--batch-size', '0'],
                ['--batch-size 0']),
  }
  for args, words in cases.values():
    result = run(sys.executable, '-m', 'dnnr_jax', 'predict', *args)
    assert_one_line_error(result, words)


def test_library_rejects_a_foreign_onnx_file(served, tmp_path):
  import onnx
  from onnx import TensorProto, helper

  graph = helper.make_graph(
      [helper.make_node('Identity', ['input'], ['logits'])], 'g',
      [helper.make_tensor_value_info('input', TensorProto.FLOAT, [1, 64])],
      [helper.make_tensor_value_info('logits', TensorProto.FLOAT, [1, 64])])
  path = tmp_path / 'foreign.onnx'
  onnx.save(helper.make_model(graph), path)
  with pytest.raises(DnnrError, match='not written by dnnr export'):
    predict_onnx(path, served[2] / 'images.gz')
