"""Model cards: a Markdown page beside each checkpoint, in Hugging Face's layout.

`write_card` renders `<checkpoint>.card.md` from the checkpoint's metadata and
its lineage: YAML front matter (`library_name`, `tags`, `datasets`,
`model-index` with the test accuracy), then model details, uses, training
data and normalisation, evaluation with the command that reproduces it, the
compression applied, limitations (what routing does and does not save), and
how to load the checkpoint in JAX and serve its ONNX export in onnxruntime.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import yaml

from dnnr_jax.config import PIXEL_MAX
from dnnr_jax.errors import DnnrError
from dnnr_jax.io.model_details import Details, card_path, config_changes, details
from dnnr_jax.io.registry import Entry, Registry, locate

ROUTING_LIMITS = {
    'per_sample': (
        'Routing is per sample: both the deep block and the shortcut run for every input and '
        'each input keeps its own result (`jnp.where`; a `Where` node in ONNX). The deep-path '
        'fraction says how many inputs took the deep block; it is not compute saved — every '
        'call costs both paths.'),
    'batch': (
        'Routing is per batch, from the batch means (`lax.cond`; an `If` node in ONNX): only '
        'the chosen path runs, so the deep block is skipped, and its compute saved, only for '
        'batches routed shallow as a whole. An input\'s prediction depends on the batch it '
        'arrives in.'),
    'deep': 'Routing is fixed to the deep block: every input takes it; nothing is saved.',
    'shallow': 'Routing is fixed to the shortcut: the deep block never runs.',
}


def write_card(models_dir: str | os.PathLike, ref: str) -> pathlib.Path:
  """Writes the model card of the checkpoint `ref` names (an export's: its checkpoint's).

  The file is rewritten only when its text changes.

  Returns:
    The card's path, beside the checkpoint.

  Raises:
    DnnrError: `ref` names nothing, or a checkpoint that is damaged,
      incomplete or missing.
  """
  registry, entry = locate(models_dir, ref)
  checkpoint = entry if entry.format == 'orbax' else registry.get(entry.parent)
  if checkpoint is None or checkpoint.state != 'ok':
    problem = checkpoint.problem if checkpoint else 'its checkpoint is not in the folder'
    raise DnnrError(f'{ref} has no sound checkpoint to describe ({problem}); '
                    'write it again with dnnr, or pass another version.')
  path = card_path(checkpoint.path)
  try:
    text = render(registry, details(registry, checkpoint))
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    raise DnnrError(f'{checkpoint.path} has metadata a card cannot describe ({error!r}); '
                    'write it again with dnnr.') from None
  if path.is_file() and path.read_text() == text:
    return path  # Unchanged: a rerun leaves the file (and its mtime) alone.
  temporary = path.with_name(f'.{path.name}.partial')
  temporary.write_text(text)
  os.replace(temporary, path)
  return path


def render(registry: Registry, info: Details) -> str:
  """The card of a checkpoint as Markdown."""
  entry, metadata = info.entry, info.entry.metadata
  dataset = metadata.get('dataset') or {}
  config = metadata.get('config', {})
  name = entry.path.name
  exports = [child for child in info.derived if child.format == 'onnx']
  sections = [
      _front_matter(entry, dataset),
      f'# {name}\n\nA dnnr_jax {entry.kind} model, version {entry.version}, written '
      f"{entry.created}: a Dynamic Neural Network Refinement MLP that classifies handwritten "
      f"digits ({dataset.get('name')}).",
      _details(registry, info, config, exports),
      _uses(dataset),
      _training_data(registry, info, dataset, config),
      _evaluation(registry, info, exports, config),
      _compression(registry, info),
      _limitations(info, config),
      _get_started(registry, entry, exports, dataset, config),
  ]
  return '\n\n'.join(sections) + '\n'


def _front_matter(entry: Entry, dataset: Mapping[str, Any]) -> str:
  name = dataset.get('name', 'unknown')
  result = {'task': {'type': 'image-classification', 'name': 'Image classification'},
            'dataset': {'type': name, 'name': name, 'split': 'test'},
            'metrics': [{'type': 'accuracy', 'value': entry.test_accuracy,
                         'name': 'test accuracy'}]}
  front = {'library_name': 'dnnr_jax',
           'tags': ['jax', 'flax', 'dynamic-routing', entry.kind, 'onnx'],
           'datasets': [name], 'metrics': ['accuracy'],
           'model-index': [{'name': entry.path.name, 'results': [result]}]}
  return f'---\n{yaml.safe_dump(front, sort_keys=False).strip()}\n---'


def _details(registry, info: Details, config, exports) -> str:
  model = config.get('model', {})
  chain = ' → '.join(f'`{step.entry.ref}`' for step in info.lineage)
  thresholds = ', '.join(f'{key} {value:.4g}' for key, value in
                         sorted(info.entry.metadata.get('thresholds', {}).items()))
  versions = ', '.join(f'{key} {value}' for key, value in info.library_versions.items())
  lines = [
      '## Model details', '',
      f"- Architecture: trunk of {model.get('hidden_sizes')} units, then for each input either "
      f"a deep block of {model.get('deep_size')} units or a linear shortcut, then a head of "
      f"{model.get('num_classes')} classes. An input goes deep when its variance and entropy "
      'exceed their thresholds and its share of near-zero features is below the sparsity one.',
      f'- Thresholds: {thresholds}; routing mode `{config.get("routing", {}).get("mode")}`.',
      f'- Lineage: {chain}.',
      f'- Files: `{_shown(registry, info.entry.path)}` (Orbax checkpoint, '
      f'{info.entry.bytes:,} bytes)' + ''.join(
          f', `{_shown(registry, export.path)}` (ONNX, {export.bytes:,} bytes)'
          for export in exports) + '.',
      f'- Written by: {versions}.']
  if 'report' in info.files:
    lines.append(f"- Pipeline report: `{_shown(registry, info.files['report'])}`.")
  return '\n'.join(lines)


def _uses(dataset) -> str:
  return '\n'.join([
      '## Uses', '',
      f"Intended use: classifying handwritten digits like those of the {dataset.get('name')} "
      'data set '
      '(same image size, normalised as below), and studying input-dependent routing and '
      'model compression. Out of scope: other kinds of image, or any decision about people, '
      'without first measuring accuracy on that data.'])


def _training_data(registry, info: Details, dataset, config) -> str:
  data = config.get('data', {})
  pixel_max = PIXEL_MAX.get(data.get('dataset'), 255.0)
  root = info.lineage[0].entry
  changes = config_changes(root.metadata.get('config', {}))
  lines = [
      '## Training data', '',
      f"- {dataset.get('name')} ({dataset.get('source')}): "
      f"{dataset.get('train_examples')} training, {dataset.get('validation_examples')} "
      f"validation and {dataset.get('test_examples')} test examples.",
      f"- Normalisation: pixels / {pixel_max:g}, then (x − {data.get('mean')}) / "
      f"{data.get('std')}, flattened to {info.entry.metadata.get('num_features')} features.",
      f'- Training (`{root.ref}`), where it differs from the defaults: ' + (
          ', '.join(f'`{key}` {value}' for key, value in changes.items()) or 'none') + '.']
  return '\n'.join(lines)


def _evaluation(registry, info: Details, exports, config) -> str:
  test = info.entry.metadata.get('metrics', {}).get('test', {})
  data_dir = ' --data-dir DIR' if config.get('data', {}).get('dataset') == 'mnist' else ''
  lines = [
      '## Evaluation', '',
      f"On the test split ({test.get('n')} examples), measured when the checkpoint was "
      'written with the function `dnnr evaluate` runs; reproduce with '
      f'`dnnr evaluate {_shown(registry, info.entry.path)}{data_dir} --json`:', '',
      '| metric | value |', '| --- | ---: |']
  for key in ('accuracy', 'loss', 'deep_fraction'):
    if isinstance(test.get(key), (int, float)):
      lines.append(f'| test {key.replace("_", " ")} | {test[key]:.6f} |')
  before = info.entry.metadata.get('metrics', {}).get('test_before', {})
  if 'accuracy' in before:
    lines.append(f"| test accuracy before this step | {before['accuracy']:.6f} |")
  for key, value in info.routes.items():
    if isinstance(value, (int, float)):
      lines.append(f'| {key.replace("_", " ")} | {value:.6f} |')
  for export in exports:
    if export.test_accuracy is not None:
      lines.append(f'| test accuracy of `{export.path.name}` in onnxruntime (pipeline report) '
                   f'| {export.test_accuracy:.6f} |')
  return '\n'.join(lines)


def _compression(registry, info: Details) -> str:
  steps = [step for step in info.lineage[1:] if step.entry.format == 'orbax']
  lines = ['## Compression', '']
  for step in steps:
    settings = ', '.join(f'{key} {value}' for key, value in step.settings.items())
    lines.append(f'- `{step.entry.ref}`: {settings}.')
  if not steps:
    lines.append('- None: dense float32 weights.')
  if info.entry.smaller_than_root is not None:
    lines.append(f'- On disk: {info.entry.bytes:,} bytes, {info.entry.smaller_than_root:.2f}× '
                 f'smaller than `{info.lineage[0].entry.ref}`.')
  return '\n'.join(lines)


def _limitations(info: Details, config) -> str:
  mode = config.get('routing', {}).get('mode', 'per_sample')
  lines = ['## Bias, risks and limitations', '', f'- {ROUTING_LIMITS.get(mode, "")}',
           '- The complexity metrics and the routing always run in float32, also in a '
           'quantized model.',
           '- Unstructured pruning makes files smaller, not inference faster: onnxruntime and '
           'XLA multiply dense kernels with zeros in them.',
           '- Accuracy is measured on one test split of one data set; robustness to other '
           'inputs and calibration of the probabilities were not measured.']
  return '\n'.join(lines)


def _get_started(registry, entry: Entry, exports, dataset, config) -> str:
  data = config.get('data', {})
  pixel_max = PIXEL_MAX.get(data.get('dataset'), 255.0)
  lines = ['## How to get started', '', 'In JAX:', '', '```python', 'import dnnr_jax', '',
           f"model = dnnr_jax.load_model('{_shown(registry, entry.path)}')",
           f"features = (pixels.reshape(len(pixels), -1) / {pixel_max:g} - {data.get('mean')})"
           f" / {data.get('std')}  # float32 [B, {entry.metadata.get('num_features')}]",
           'logits, deep_path = model.predict_with_routes(features)', '```', '']
  if not exports:
    lines.append(f'Export it for onnxruntime with `dnnr export {_shown(registry, entry.path)}`.')
    return '\n'.join(lines)
  export = exports[0]
  raw = export.metadata.get('dnnr_jax.input') == 'uint8 images'
  feed = 'images  # uint8 [B, side, side]' if raw else 'features.astype(np.float32)'
  lines += ['In onnxruntime (no JAX needed):', '', '```python', 'import numpy as np',
            'import onnxruntime', '',
            f"session = onnxruntime.InferenceSession('{_shown(registry, export.path)}', "
            "providers=['CPUExecutionProvider'])",
            f"logits, deep_path = session.run(['logits', 'deep_path'], {{'input': {feed}}})",
            '```']
  return '\n'.join(lines)


def _shown(registry: Registry, path: pathlib.Path) -> str:
  """`path` as seen from the folder that holds the models folder."""
  try:
    return str(path.relative_to(registry.root.parent))
  except ValueError:
    return str(path)
