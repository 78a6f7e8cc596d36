"""`dnnr models` through the real CLI, on models folders built from metadata alone.

Each folder here is written file by file as `save_checkpoint` lays a checkpoint
out (Orbax's commit files, `metadata/metadata`, `variables/`), so listing,
lineage, states, rm and gc are tested without training anything. The pipeline's
own folder is listed, and its cards checked against `dnnr evaluate`, in
tests/test_pipeline.py.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import onnx
import pytest

from dnnr_jax.config import Config
from dnnr_jax.io import artifact_state, onnx_props, registry
from tests.cli_helpers import TIMEOUT_S, assert_one_line_error, one_json, snapshot
from tests.conftest import ROOT


def dnnr(*args) -> subprocess.CompletedProcess:
  """`dnnr ARGS` with no terminal on stdin (so rm and gc cannot ask)."""
  return subprocess.run([sys.executable, '-m', 'dnnr_jax', *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT_S,
                        stdin=subprocess.DEVNULL, env=os.environ.copy())


def checkpoint(models, kind, version, *, parent=None, accuracy=0.9, created=None,
               array_bytes=1000):
  """A checkpoint directory with the files and metadata `save_checkpoint` writes."""
  path = models / kind / registry.KINDS[kind].format(version=version)
  config = Config().to_dict()
  config['training']['epochs'] = 3
  metadata = {
      'format': 'dnnr_jax', 'format_version': 4, 'kind': kind, 'version': version,
      'created': created or f'2026-01-0{1 + list(registry.KINDS).index(kind)}T00:00:{version}',
      'config': config, 'layout': [], 'library_versions': {'jax': '0.10.2'},
      'metrics': {'test': {'accuracy': accuracy, 'deep_fraction': 0.5, 'loss': 0.3, 'n': 10}},
      'dataset': {'name': 'digits'}}
  if parent is not None:
    metadata['source'] = {'path': str(parent), 'kind': parent.parent.name, 'version': version}
    metadata['compression'] = {'method': 'global', 'sparsity': 0.8}
  for name in (*artifact_state.REQUIRED_FILES[:1], *artifact_state.REQUIRED_FILES[2:],
               'variables/manifest.ocdbt'):
    (path / name).parent.mkdir(parents=True, exist_ok=True)
    (path / name).write_text('{}')
  (path / 'variables' / 'd').mkdir()
  (path / 'variables' / 'd' / 'data').write_bytes(b'\0' * array_bytes)
  (path / 'metadata').mkdir()
  (path / 'metadata' / 'metadata').write_text(json.dumps(metadata))
  return path


def export(path):
  """A small valid ONNX file beside checkpoint `path`, with dnnr export's metadata."""
  graph = onnx.helper.make_graph(
      [onnx.helper.make_node('Identity', ['input'], ['logits'])], 'g',
      [onnx.helper.make_tensor_value_info('input', onnx.TensorProto.FLOAT, [1])],
      [onnx.helper.make_tensor_value_info('logits', onnx.TensorProto.FLOAT, [1])],
      [onnx.numpy_helper.from_array(__import__('numpy').zeros(64, 'float32'), 'w')])
  model = onnx.helper.make_model(graph)
  onnx.helper.set_model_props(model, {
      'dnnr_jax.kind': path.parent.name, 'dnnr_jax.version': path.name.split('_v')[1][:3],
      'dnnr_jax.source_checkpoint': str(path), 'dnnr_jax.dataset': 'digits'})
  output = path.with_name(path.name + '.onnx')
  onnx.save(model, output)
  return output


@pytest.fixture
def lineage(tmp_path):
  """final 1.0 -> pruned 1.0 -> quantized 1.0, each with its export."""
  models = tmp_path / 'models'
  final = checkpoint(models, 'final', '1.0', array_bytes=8000)
  pruned = checkpoint(models, 'pruned', '1.0', parent=final, accuracy=0.8, array_bytes=2000)
  quantized = checkpoint(models, 'quantized', '1.0', parent=pruned, array_bytes=500)
  for path in (final, pruned, quantized):
    export(path)
  return models


def _size(path):
  return sum(file.stat().st_size for file in path.rglob('*') if file.is_file())


def test_lists_every_version_with_lineage_bytes_and_ratio(lineage):
  listed = one_json(dnnr('models', '--models-dir', lineage, '--json'))
  rows = {row['ref']: row for row in listed['entries']}
  assert list(rows) == ['final:1.0', 'final:1.0.onnx', 'pruned:1.0', 'pruned:1.0.onnx',
                        'quantized:1.0', 'quantized:1.0.onnx']
  final, pruned = lineage / 'final' / 'model_v1.0_final', lineage / 'pruned' / 'pruned_model_v1.0'
  assert rows['pruned:1.0']['parent'] == str(final)
  assert rows['quantized:1.0']['parent'] == str(pruned)
  assert rows['pruned:1.0.onnx']['parent'] == str(pruned)
  assert rows['pruned:1.0']['bytes'] == _size(pruned)
  assert rows['pruned:1.0']['smaller_than_root'] == pytest.approx(_size(final) / _size(pruned))
  assert rows['final:1.0']['smaller_than_root'] == 1.0
  assert rows['pruned:1.0']['test_accuracy'] == 0.8
  assert {row['state'] for row in rows.values()} == {'ok'}
  text = dnnr('models', '--models-dir', lineage)
  assert text.returncode == 0 and 'quantized:1.0.onnx' in text.stdout


def test_the_library_returns_frozen_records(lineage):
  from dnnr_jax.io import model_details, model_removal

  found = registry.scan(lineage)
  quantized = found.find('quantized:1.0')
  assert [entry.ref for entry in found.lineage(quantized)] == [
      'final:1.0', 'pruned:1.0', 'quantized:1.0']
  with pytest.raises(dataclasses.FrozenInstanceError):
    quantized.state = 'ok'
  assert model_details.show(lineage, 'pruned:1.0').lineage[1].settings['sparsity'] == 0.8
  plan = model_removal.plan_rm(lineage, 'quantized:1.0')
  assert [path.name for path in plan.paths] == ['quantized_model_v1.0',
                                                'quantized_model_v1.0.onnx']
  assert (lineage / 'quantized' / 'quantized_model_v1.0').is_dir()  # Planning removes nothing.


def test_listing_imports_no_jax(lineage):
  code = ('import sys; from dnnr_jax.cli import main; '
          f"main(['models', '--models-dir', {str(lineage)!r}, '--json']); "
          "assert 'jax' not in sys.modules and 'numpy' not in sys.modules, 'imported'")
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('relocate', [shutil.move, shutil.copytree])
def test_a_moved_or_copied_folder_keeps_its_own_lineage(lineage, tmp_path, relocate):
  elsewhere = tmp_path / 'backup'
  relocate(lineage, elsewhere)
  rows = {row['ref']: row for row in one_json(
      dnnr('models', '--models-dir', elsewhere, '--json'))['entries']}
  assert rows['quantized:1.0']['parent'] == str(elsewhere / 'pruned' / 'pruned_model_v1.0')
  assert rows['final:1.0.onnx']['parent'] == str(elsewhere / 'final' / 'model_v1.0_final')
  refused = dnnr('models', 'rm', 'pruned:1.0', '--yes', '--models-dir', elsewhere)
  assert_one_line_error(refused, ['quantized:1.0'])


def test_a_compressed_checkpoint_in_plain_zarr_is_sound_until_a_chunk_is_missing(tmp_path):
  """Format 7 stores a compressed model's coded leaves without OCDBT: `.zarray` and `0` each."""
  path = checkpoint(tmp_path / 'models', 'quantized', '1.0')
  shutil.rmtree(path / 'variables' / 'd')
  (path / 'variables' / 'manifest.ocdbt').unlink()
  for leaf in ('params.trunk_0.entropy_coded', 'thresholds.entropy_coded'):
    (path / 'variables' / leaf).mkdir()
    (path / 'variables' / leaf / '.zarray').write_text('{}')
    (path / 'variables' / leaf / '0').write_bytes(b'\0' * 8)
  files = {str(file.relative_to(path)) for file in path.rglob('*') if file.is_file()}
  assert artifact_state.checkpoint_state(path, files)[:2] == ('ok', '')
  files.discard('variables/thresholds.entropy_coded/0')
  state, problem, _ = artifact_state.checkpoint_state(path, files)
  assert state == 'incomplete'
  assert problem == 'missing variables/thresholds.entropy_coded/0 (the array data)'


def test_damaged_and_half_written_versions_are_listed_as_such(lineage):
  pruned = lineage / 'pruned' / 'pruned_model_v1.0'
  half = lineage / 'final' / 'model_v1.1_final'
  shutil.copytree(lineage / 'final' / 'model_v1.0_final', half)
  (half / 'variables' / 'manifest.ocdbt').unlink()
  shutil.copytree(pruned, lineage / 'pruned' / '.pruned_model_v1.1.partial')
  (pruned / 'metadata' / 'metadata').write_text('{"format": "dnnr_jax", "kin')
  onnx_file = lineage / 'quantized' / 'quantized_model_v1.0.onnx'
  onnx_file.write_bytes(onnx_file.read_bytes()[:-40])
  listed = one_json(dnnr('models', '--models-dir', lineage, '--json'))['entries']
  states = {os.path.basename(row['path']): (row['state'], row['problem']) for row in listed}
  assert states['model_v1.1_final'][0] == 'incomplete'
  assert 'variables/manifest.ocdbt' in states['model_v1.1_final'][1]
  assert states['.pruned_model_v1.1.partial'][0] == 'incomplete'
  assert states['pruned_model_v1.0'][0] == 'damaged' and 'JSON' in states['pruned_model_v1.0'][1]
  assert states['quantized_model_v1.0.onnx'][0] == 'damaged'
  assert states['model_v1.0_final'] == ('ok', '')
  text = dnnr('models', '--models-dir', lineage)
  assert text.returncode == 0 and 'damaged' in text.stdout and 'incomplete' in text.stdout


def test_odd_metadata_values_and_dangling_links_never_crash_the_listing(lineage):
  odd = checkpoint(lineage, 'final', '1.1')
  metadata_file = odd / 'metadata' / 'metadata'
  metadata = json.loads(metadata_file.read_text())
  metadata.update(kind=3, created=5, dataset=[1], metrics={'test': {'accuracy': 'high'}})
  metadata_file.write_text(json.dumps(metadata))
  (odd / 'variables' / 'link').symlink_to(odd / 'nowhere')
  rows = {os.path.basename(row['path']): row for row in one_json(
      dnnr('models', '--models-dir', lineage, '--json'))['entries']}
  odd_row = rows['model_v1.1_final']
  assert (odd_row['kind'], odd_row['created'], odd_row['test_accuracy']) == ('final', None, None)
  assert odd_row['state'] == 'damaged' and "'dataset'" in odd_row['problem']
  assert_one_line_error(dnnr('models', 'card', 'final:1.1', '--models-dir', lineage),
                        ['final:1.1', "'dataset'"])
  shutil.rmtree(odd / 'variables')
  assert_one_line_error(dnnr('models', 'card', 'final:1.1', '--models-dir', lineage),
                        ['final:1.1', 'missing variables/_METADATA'])


def test_show_gives_the_chain_and_each_steps_settings(lineage):
  shown = one_json(dnnr('models', 'show', 'quantized:1.0.onnx', '--models-dir', lineage,
                        '--json'))
  assert [step['ref'] for step in shown['lineage']] == [
      'final:1.0', 'pruned:1.0', 'quantized:1.0', 'quantized:1.0.onnx']
  # The training config as its differences from the defaults: only the epochs changed.
  assert shown['lineage'][0]['settings'] == {'training.epochs': 3}
  assert shown['lineage'][1]['settings'] == {'method': 'global', 'sparsity': 0.8}
  assert shown['metrics']['test.accuracy'] == 0.9
  # A path works as well as kind:version, from anywhere, without --models-dir.
  by_path = one_json(dnnr('models', 'show', lineage / 'pruned' / 'pruned_model_v1.0', '--json'))
  assert by_path['entry']['ref'] == 'pruned:1.0' and by_path['derived'] == [
      'pruned:1.0.onnx', 'quantized:1.0']


def test_diff_marks_what_changed(lineage):
  result = one_json(dnnr('models', '--models-dir', lineage, 'diff', 'final:1.0', 'pruned:1.0',
                         '--json'))
  rows = {row['key']: row for row in result['rows']}
  assert rows['metrics.test.accuracy'] == {'key': 'metrics.test.accuracy', 'left': 0.9,
                                           'right': 0.8, 'changed': True}
  assert rows['config.training.epochs']['changed'] is False
  assert rows['compression.method'] == {'key': 'compression.method', 'left': None,
                                        'right': 'global', 'changed': True}
  text = dnnr('models', '--models-dir', lineage, 'diff', 'final:1.0', 'pruned:1.0',
              '--only-changed')
  assert '* metrics.test.accuracy' in text.stdout and 'config.training.epochs' not in text.stdout


def test_rm_refuses_while_a_version_derives_from_it(lineage):
  before = snapshot(lineage)
  refused = dnnr('models', 'rm', 'pruned:1.0', '--models-dir', lineage, '--yes')
  assert_one_line_error(refused, ['pruned:1.0', 'quantized:1.0', 'force'])
  assert snapshot(lineage) == before
  removed = one_json(dnnr('models', 'rm', 'quantized:1.0', '--models-dir', lineage, '--yes',
                          '--json'))['removed']
  assert sorted(removed) == [str(lineage / 'quantized' / name) for name in (
      'quantized_model_v1.0', 'quantized_model_v1.0.onnx')]
  assert one_json(dnnr('models', 'rm', 'pruned:1.0', '--models-dir', lineage, '--yes',
                       '--json'))['removed']
  assert sorted(path.name for path in lineage.rglob('*_v1.0*') if path.parent.parent == lineage
                ) == ['model_v1.0_final', 'model_v1.0_final.onnx']


def test_rm_force_leaves_the_child_without_its_source(lineage):
  dnnr('models', 'card', 'pruned:1.0', '--models-dir', lineage)  # Goes with its checkpoint.
  assert (lineage / 'pruned' / 'pruned_model_v1.0.card.md').is_file()
  result = dnnr('models', 'rm', 'pruned:1.0', '--force', '--yes', '--models-dir', lineage)
  assert result.returncode == 0, result.stderr
  assert 'quantized:1.0 keeps working but loses its source' in result.stdout
  assert sorted(path.name for path in (lineage / 'pruned').iterdir()) == []
  rows = {row['ref']: row for row in one_json(
      dnnr('models', '--models-dir', lineage, '--json'))['entries']}
  orphan = rows['quantized:1.0']
  assert orphan['state'] == 'ok' and orphan['smaller_than_root'] is None
  assert orphan['parent'].endswith('pruned_model_v1.0')


def test_gc_keeps_the_newest_and_everything_referenced(lineage):
  for version in ('1.1', '1.2', '1.3'):
    checkpoint(lineage, 'final', version)
  checkpoint(lineage, 'pruned', '1.1', parent=lineage / 'final' / 'model_v1.0_final')
  unfinished = lineage / 'final' / '.model_v1.4_final.partial'
  unfinished.mkdir()
  result = one_json(dnnr('models', 'gc', '--keep', '1', '--yes', '--json',
                         '--models-dir', lineage))
  assert sorted(result['removed']) == [str(lineage / 'final' / f'model_v{version}_final')
                                       for version in ('1.1', '1.2')]
  refs = [row['ref'] for row in one_json(dnnr('models', '--models-dir', lineage, '--json'))[
      'entries'] if row['state'] == 'ok']
  assert refs == ['final:1.0', 'final:1.0.onnx', 'final:1.3', 'pruned:1.0', 'pruned:1.0.onnx',
                  'pruned:1.1', 'quantized:1.0', 'quantized:1.0.onnx']
  assert unfinished.is_dir()


@pytest.mark.parametrize('args, words', [
    (['rm', 'final:2.0', '--yes'], ['final:2.0', 'no version']),
    (['rm', 'final:1.0', '--yes'], ['final:1.0', '2 versions', 'model_v1.0_final_copy']),
    (['rm', 'final:1.0', '--force', '--yes', '--models-dir', 'missing'], ['missing']),
    (['rm', 'quantized:1.0'], ['--yes', 'terminal']),
    (['gc', '--keep', '0'], ['--yes', 'terminal']),
    (['gc', '--keep', '-1', '--yes'], ['keep', '-1']),
])
def test_bad_input_is_one_sentence_and_removes_nothing(lineage, args, words):
  shutil.copytree(lineage / 'final' / 'model_v1.0_final',
                  lineage / 'final' / 'model_v1.0_final_copy')
  before = snapshot(lineage)
  if '--models-dir' not in args:
    args = [*args, '--models-dir', lineage]
  else:
    args = [lineage / arg if arg == 'missing' else arg for arg in args]
  assert_one_line_error(dnnr('models', *args), words)
  assert snapshot(lineage) == before


def test_onnx_props_match_onnx_and_refuse_a_truncated_file(lineage):
  path = lineage / 'final' / 'model_v1.0_final.onnx'
  expected = {prop.key: prop.value for prop in onnx.load(path).metadata_props}
  assert onnx_props.read_metadata_props(path) == expected and len(expected) == 4
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(ValueError, match='truncated'):
    onnx_props.read_metadata_props(path)


def test_kinds_mirror_the_checkpoint_module():
  from dnnr_jax.io import checkpoint as checkpoint_lib

  assert registry.KINDS == {kind: pattern for kind, (_, pattern) in checkpoint_lib.KINDS.items()}
  assert all(folder == kind for kind, (folder, _) in checkpoint_lib.KINDS.items())


def test_edited_metadata_is_listed_as_damaged(tmp_path):
  # The digest `save_checkpoint` records covers the metadata; an edit shows.
  from dnnr_jax.io import integrity

  models = tmp_path / 'models'
  sealed = checkpoint(models, 'final', '1.0')
  target = sealed / 'metadata' / 'metadata'
  target.write_text(json.dumps(integrity.seal(json.loads(target.read_text()), None)))
  def state_of(path):
    files = {str(file.relative_to(path)) for file in path.rglob('*') if file.is_file()}
    return artifact_state.checkpoint_state(path, files)

  assert state_of(sealed)[0] == 'ok'
  metadata = json.loads(target.read_text())
  metadata['config']['data']['mean'] = 0.5
  target.write_text(json.dumps(metadata))
  state, problem, _ = state_of(sealed)
  assert state == 'damaged' and 'digest' in problem


def test_a_format_8_checkpoint_lists_with_the_copies_it_leaves_out(tmp_path):
  """Format 8 stores no copies ('quantization', 'dataset.normalisation'); the registry, which
  reads the JSON alone, sees them as `read_metadata` does."""
  from dnnr_jax.io import checkpoint as checkpoint_lib

  source = checkpoint_lib.load_model(ROOT / 'tests' / 'data' / 'format7' / 'checkpoint')
  data = source.metadata['config']['data']
  metadata = {
      'kind': 'quantized', 'version': '1.0', 'config': source.metadata['config'],
      'num_features': 64, 'compression': {'mode': 'weight_only', 'bits': 4, 'per_channel': True},
      'quantization': {'mode': 'weight_only', 'bits': 4},
      'dataset': {'name': 'digits', 'normalisation': {'mean': data['mean'], 'std': data['std']}}}
  models = tmp_path / 'models'
  path = checkpoint_lib.save_checkpoint(
      models / 'quantized' / 'quantized_model_v1.0', source.variables, metadata)
  stored = json.loads((path / 'metadata' / 'metadata').read_text())
  assert 'quantization' not in stored and 'normalisation' not in stored['dataset']
  entry = registry.scan(models).get(path)
  assert entry.state == 'ok', entry.problem
  for key in ('quantization', 'dataset', 'compression'):
    assert entry.metadata[key] == metadata[key] == checkpoint_lib.read_metadata(path)[key]
  shown = one_json(dnnr('models', 'show', path, '--models-dir', models, '--json'))
  assert 'weight_only' in json.dumps(shown)
