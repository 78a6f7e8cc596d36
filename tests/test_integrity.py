"""Digests: a damaged or edited checkpoint, periodic checkpoint or ONNX file is refused."""

import dataclasses
import json
import logging
import pathlib
import re
import shutil

import jax
import numpy as np
import onnx
import onnxruntime
import orbax.checkpoint as ocp
import pytest

from dnnr_jax.config import PruneConfig, QuantizeConfig, load_config
from dnnr_jax.errors import CheckpointError, DnnrError, IntegrityError
from dnnr_jax.io import checkpoint, export, integrity, serve
from dnnr_jax.jobs import compress
from dnnr_jax.jobs import train as jobs
from tests.conftest import SMOKE_CONFIG

logging.getLogger('onnx_ir').setLevel(logging.ERROR)
# After a failed read, TensorStore may call back into Orbax's closed event loop.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@dataclasses.dataclass(frozen=True)
class Models:
  root: pathlib.Path
  final: pathlib.Path
  pruned: pathlib.Path
  quantized: pathlib.Path
  other: pathlib.Path  # final model of another seed
  onnx_file: pathlib.Path


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """Final, pruned and quantized smoke checkpoints, another seed's, and one export."""
  root = tmp_path_factory.mktemp('integrity')
  config = load_config(SMOKE_CONFIG, ['training.epochs=1', 'training.checkpoint_every=0'])
  final, _ = jobs.train_and_save(config, models_dir=root / 'models')
  other, _ = jobs.train_and_save(config.replace(training=dataclasses.replace(
      config.training, seed=1)), models_dir=root / 'other')
  pruned = compress.prune_checkpoint(final, PruneConfig(
      sparsity=0.8, schedule='oneshot', finetune_epochs=0)).path
  quantized = compress.quantize_checkpoint(pruned, QuantizeConfig(finetune_epochs=0)).path
  onnx_file, _ = export.export_onnx(final)
  return Models(root, final, pruned, quantized, other, onnx_file)


def _copy(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  shutil.copytree(source, target)
  return target


def _largest_array_file(path: pathlib.Path) -> pathlib.Path:
  # The merged OCDBT store Orbax reads (`variables/d/`; a process's own `d/` is then
  # unused), or in a compressed model (format 7) the plain zarr data files.
  ocdbt = path / 'variables' / 'd'
  data = (list(ocdbt.iterdir()) if ocdbt.is_dir()
          else list((path / 'variables').glob('*/0')))
  return max((f for f in data if f.is_file()), key=lambda f: f.stat().st_size)


def _flip_middle_byte(file: pathlib.Path, mask: int = 0x01) -> None:
  data = bytearray(file.read_bytes())
  data[len(data) // 2] ^= mask
  file.write_bytes(bytes(data))


def _edit_metadata(path: pathlib.Path, edit, reseal: bool = False) -> None:
  """Applies `edit` to the stored metadata JSON; with `reseal`, digests it again."""
  target = path / 'metadata' / 'metadata'
  metadata = json.loads(target.read_text())
  edit(metadata)
  if reseal:
    rest = {key: value for key, value in metadata.items() if key != integrity.KEY}
    metadata[integrity.KEY]['metadata'] = integrity.json_digest(rest)
  target.write_text(json.dumps(metadata))


# Checkpoints.


@pytest.mark.parametrize('kind', ['final', 'pruned', 'quantized'])
def test_a_flipped_byte_in_the_arrays_is_refused_or_harmless(models, tmp_path, kind):
  """Never silently wrong: each flip is refused, or loads the very same arrays.

  (A byte that no array reads, e.g. in a superseded node of Orbax's store,
  changes nothing.)
  """
  good = jax.tree.leaves(checkpoint.load_model(getattr(models, kind)).variables)
  refused = 0
  for fraction in (0.3, 0.5, 0.7, 0.9):
    path = _copy(getattr(models, kind), tmp_path / f'{kind}{fraction}')
    target = _largest_array_file(path)
    data = bytearray(target.read_bytes())
    data[int(len(data) * fraction)] ^= 0x7f
    target.write_bytes(bytes(data))
    try:
      loaded = checkpoint.load_model(path)
    except CheckpointError as error:
      assert str(path) in str(error) and 'damaged' in str(error)
      refused += 1
      continue
    for left, right in zip(jax.tree.leaves(loaded.variables), good, strict=True):
      np.testing.assert_array_equal(np.asarray(left), np.asarray(right))
  assert refused >= 2


@pytest.mark.parametrize('edit, words', [
    (lambda metadata: metadata['config']['data'].update(mean=0.5), 'metadata'),
    (lambda metadata: metadata['config']['routing'].update(mode='deep'), 'metadata'),
    (lambda metadata: metadata['thresholds'].update(variance=9.0), 'metadata'),
    (lambda metadata: metadata.pop(integrity.KEY), 'lost the digests'),
], ids=['data.mean', 'routing.mode', 'thresholds', 'digest removed'])
def test_edited_metadata_is_refused(models, tmp_path, edit, words):
  path = _copy(models.final, tmp_path / 'edited')
  _edit_metadata(path, edit)
  with pytest.raises(IntegrityError, match=words) as raised:
    checkpoint.load_model(path)
  assert str(path) in str(raised.value) and 'edited' in str(raised.value)


def test_another_runs_arrays_copied_in_are_refused(models, tmp_path):
  path = _copy(models.final, tmp_path / 'swapped')
  shutil.rmtree(path / 'variables')
  shutil.copytree(models.other / 'variables', path / 'variables')
  with pytest.raises(IntegrityError, match='array'):
    checkpoint.load_model(path)


@pytest.mark.parametrize('kind', ['final', 'quantized'])
def test_plain_orbax_still_reads_a_checkpoint(models, kind):
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(getattr(models, kind))
  metadata = restored['metadata']
  assert metadata['format_version'] == checkpoint.FORMAT_VERSION
  # The model's own tree (a compressed one: its one coded leaf), every leaf's digest (its
  # first 16 hex digits) recorded under its path.
  digests = metadata[integrity.KEY]['arrays']
  if kind == 'final':
    assert sorted(restored['variables']) == ['params', 'thresholds']
    assert 'params/trunk_0/bias' in digests
  else:
    assert list(restored['variables']) == list(digests) == ['entropy_coded']
  assert digests == {name: digest[:integrity.DIGEST_CHARS]
                     for name, digest in integrity.tree_digests(restored['variables']).items()}


def test_array_digest_covers_dtype_shape_and_bytes():
  base = np.arange(6, dtype=np.float32)
  assert integrity.array_digest(base) == integrity.array_digest(base.copy())
  for other in (base.astype(np.int32), base.reshape(2, 3), np.where(base == 5, 6, base)):
    assert integrity.array_digest(other) != integrity.array_digest(base)


# Bounded parsing: a layout is checked against the config before allocation.


def _edit_row(metadata, edit) -> None:
  """Rewrites the first leaf's spec string of a format-8 layout."""
  row = metadata['layout']['leaves'][0]
  row[1] = edit(row[1])


@pytest.mark.parametrize('edit, words', [
    (lambda m: _edit_row(m, lambda spec: re.sub(r'\[[0-9,]*\]', '[20000,20000]', spec, count=1)),
     '[20000, 20000]'),
    (lambda m: _edit_row(m, lambda spec: re.sub(r'=(\w+)$', r'=\1[400000000]', spec)),
     'values for'),
    (lambda m: m['config']['model'].update(hidden_sizes=[48, 32]), 'the config makes it'),
], ids=['leaf_shape', 'stored_array', 'hidden_sizes'])
def test_a_layout_the_config_does_not_give_is_refused(models, tmp_path, edit, words):
  path = _copy(models.final, tmp_path / 'crafted')
  _edit_metadata(path, edit, reseal=True)
  with pytest.raises(CheckpointError, match='does not match its own config') as raised:
    checkpoint.load_model(path)
  assert words in str(raised.value)



def test_a_coded_stream_the_layout_cannot_hold_is_refused(models, tmp_path):
  """Format 8: the one stream may not be longer than the values it codes (raw at most)."""
  path = _copy(models.quantized, tmp_path / 'crafted')
  _edit_metadata(path, lambda m: m['layout'].update(entropy_coded=10**9), reseal=True)
  with pytest.raises(CheckpointError, match='stream of 1000000000 bytes codes'):
    checkpoint.load_model(path)


def test_a_garbled_layout_is_one_sentence(models, tmp_path):
  path = _copy(models.quantized, tmp_path / 'garbled')
  _edit_metadata(path, lambda m: _edit_row(m, lambda spec: spec.replace('[', '(')), reseal=True)
  with pytest.raises(CheckpointError, match='has a damaged layout in its metadata') as raised:
    checkpoint.load_model(path)
  assert len(str(raised.value).splitlines()) == 1

# Lineage.


def test_a_lineage_that_names_itself_is_refused(models, tmp_path):
  path = _copy(models.pruned, tmp_path / 'pruned_model_v1.0')
  _edit_metadata(path, lambda m: m['source'].update(path=str(path)), reseal=True)
  with pytest.raises(CheckpointError, match='loops back'):
    checkpoint.lineage(path)
  with pytest.raises(CheckpointError, match='loops back'):
    compress.quantize_checkpoint(path, QuantizeConfig(finetune_epochs=0),
                                 models_dir=tmp_path / 'out')


def test_lineage_reaches_the_final_model(models):
  chain = checkpoint.lineage(models.quantized)
  assert [path for path, _ in chain] == [models.quantized, models.pruned, models.final]


def test_a_job_may_not_replace_its_own_source(models):
  with pytest.raises(DnnrError, match='its own source'):
    compress.prune_checkpoint(models.pruned, PruneConfig(schedule='oneshot', finetune_epochs=0),
                              version='1.0', overwrite=True)
  checkpoint.load_model(models.pruned)


# Periodic checkpoints.


def test_a_damaged_periodic_checkpoint_is_not_resumed(tmp_path):
  config = load_config(SMOKE_CONFIG, ['training.epochs=2'])

  def stop(record):
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    jobs.train_and_save(config, models_dir=tmp_path, on_epoch=stop)
  periodic = tmp_path / 'checkpoints' / 'model_v1.0_final' / '1'
  data = [f for f in (periodic / 'train_state').rglob('*')
          if f.is_file() and f.parent.name == 'd']
  _flip_middle_byte(max(data, key=lambda f: f.stat().st_size))
  with pytest.raises(CheckpointError, match='damaged') as raised:
    jobs.train_and_save(config, models_dir=tmp_path, resume=True)
  assert str(periodic) in str(raised.value)
  assert periodic.is_dir()


# ONNX.


def test_an_export_carries_a_digest_and_onnxruntime_still_opens_it(models):
  onnx_model = onnx.load(models.onnx_file)
  props = {prop.key: prop.value for prop in onnx_model.metadata_props}
  assert props[integrity.ONNX_KEY] == integrity.onnx_digest(onnx_model)
  session = onnxruntime.InferenceSession(str(models.onnx_file),
                                         providers=['CPUExecutionProvider'])
  assert session.get_modelmeta().custom_metadata_map[integrity.ONNX_KEY].startswith('sha256:')


def _edited_onnx(models, tmp_path, change, reseal=False) -> pathlib.Path:
  onnx_model = onnx.load(models.onnx_file)
  change(onnx_model)
  if reseal:
    integrity.seal_onnx(onnx_model)
  path = tmp_path / 'edited.onnx'
  onnx.save(onnx_model, path)
  return path


def _set_prop(key, value):
  def change(onnx_model):
    for prop in onnx_model.metadata_props:
      if prop.key == key:
        prop.value = value
  return change


def _scale_first_initializer(onnx_model):
  initializer = onnx_model.graph.initializer[0]
  array = onnx.numpy_helper.to_array(initializer)
  initializer.CopyFrom(onnx.numpy_helper.from_array(array * 2, initializer.name))


@pytest.mark.parametrize('change', [
    _scale_first_initializer,
    _set_prop('dnnr_jax.normalisation', 'mean=0.5,std=0.3760'),
    _set_prop(integrity.ONNX_KEY, 'sha256:' + '0' * 64),
], ids=['weights', 'normalisation', 'digest'])
def test_an_edited_onnx_file_is_refused(models, tmp_path, change):
  path = _edited_onnx(models, tmp_path, change)
  with pytest.raises(IntegrityError, match='damaged or was edited') as raised:
    serve.load_onnx(path)
  assert str(path) in str(raised.value)


def test_a_flipped_byte_in_an_onnx_file_is_refused(models, tmp_path):
  path = tmp_path / 'flipped.onnx'
  shutil.copy(models.onnx_file, path)
  _flip_middle_byte(path, 0x7f)
  with pytest.raises(DnnrError) as raised:
    serve.load_onnx(path)
  assert str(path) in str(raised.value)
  assert 'damaged' in str(raised.value) or 'not a valid ONNX' in str(raised.value)


@pytest.mark.parametrize('value', ['mean=abc,std=0.3', 'mean=0.3,std=0', 'mean=0.3',
                                   'mean=0.3,std=nan'])
def test_bad_normalisation_metadata_is_refused(models, tmp_path, value):
  path = _edited_onnx(models, tmp_path, _set_prop('dnnr_jax.normalisation', value), reseal=True)
  with pytest.raises(DnnrError, match='damaged normalisation metadata'):
    serve.load_onnx(path)


def test_an_export_without_a_digest_still_loads(models, tmp_path):
  def strip(onnx_model):
    for prop in list(onnx_model.metadata_props):
      if prop.key == integrity.ONNX_KEY:
        onnx_model.metadata_props.remove(prop)

  model = serve.load_onnx(_edited_onnx(models, tmp_path, strip))
  assert model.mean == pytest.approx(0.3053)


def test_onnx_predict_refuses_nan_and_inf(models):
  model = serve.load_onnx(models.onnx_file)
  inputs = np.zeros((3, 64), np.float32)
  assert model.predict(inputs).shape == (3, 10)
  for bad in (np.nan, np.inf):
    inputs[1, 5] = bad
    with pytest.raises(DnnrError, match='NaN or infinite'):
      model.predict(inputs)


@pytest.mark.parametrize('kind', ['final', 'quantized'])
def test_predict_refuses_nan_and_inf_but_not_a_sum_that_overflows(models, kind):
  model = checkpoint.load_model(getattr(models, kind))
  inputs = np.zeros((3, 64), np.float32)
  assert model.predict(inputs).shape == (3, 10)
  # Finite inputs whose sum overflows float32: the quick test's sum is infinite.
  huge = np.full((3, 64), np.finfo(np.float32).max / 4, np.float32)
  assert model.predict(huge).shape == (3, 10)
  for bad in (np.nan, np.inf, -np.inf):
    inputs[1, 5] = bad
    with pytest.raises(CheckpointError, match='NaN or infinite'):
      model.predict(inputs)
