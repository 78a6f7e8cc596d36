"""Compress a user's own small CNN on MNIST end to end, with the library API only.

Train a Linen CNN (two convolutions and a dense head) briefly; fine-tune it
while pruning to 90 % with `compress.pruning` over the user's optax
optimizer; quantize it with `compress.quantize_linen`: the convolutions static
int8 (input and output ranges calibrated on training images, exported as
`QLinearConv`), the dense layers dynamic int8;
save it compact; export it (and its float version) to ONNX. Then the same
weights through an NNX model with `compress.quantize_nnx`, exported too; the
three ONNX files are served side by side in onnxruntime, and the report gives
the int8 exports' batch-256 throughput and batch-1 latency as ratios to the
float export's (`int8_vs_float`, `nnx_int8_vs_float`). Prints one JSON report.

  PYTHONPATH=. python scripts/compress_cnn.py --data-dir /path/to/mnist --out /tmp/cnn
"""

import argparse
import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import onnxruntime
import optax
from flax import nnx

import dnnr_jax
from dnnr_jax import compress
from dnnr_jax.io.data import load_mnist_arrays
from dnnr_jax.jobs.timing import compare_inference, machine


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


class NnxCNN(nnx.Module):
  def __init__(self, rngs):
    self.Conv_0 = nnx.Conv(1, 32, (3, 3), strides=2, rngs=rngs)
    self.Conv_1 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
    self.Dense_0 = nnx.Linear(7 * 7 * 64, 128, rngs=rngs)
    self.Dense_1 = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.Conv_1(nnx.relu(self.Conv_0(x))))
    return self.Dense_1(nnx.relu(self.Dense_0(x.reshape(x.shape[0], -1))))


def train(model, params, tx, images, labels, epochs, seed):
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(
          model.apply({'params': p}, x), y).mean()

    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(images))
    for start in range(0, len(order) - 127, 128):
      batch = order[start:start + 128]
      params, state = step(params, state, images[batch], labels[batch])
  return params, state


def accuracy(predict, images, labels):
  logits = np.concatenate([np.asarray(predict(images[i:i + 500]))
                           for i in range(0, len(images), 500)])
  return float(np.mean(logits.argmax(-1) == labels)), logits


def serving_speed(paths, images):
  """Batch-1 latency (µs) and batch-256 throughput (images/s) of each ONNX file in
  onnxruntime, the files timed side by side (`dnnr_jax.jobs.timing.compare_inference`)."""
  sessions = {name: onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
              for name, path in paths.items()}
  runners = {name: (lambda batch, session=session: session.run(None, {'input': batch}))
             for name, session in sessions.items()}
  return compare_inference(runners, images[:256], seconds=3.0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data-dir', required=True)
  parser.add_argument('--out', required=True, type=pathlib.Path)
  parser.add_argument('--epochs', type=int, default=2)
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  data = load_mnist_arrays(args.data_dir)
  def prepare(images):
    return (images.astype(np.float32) / 255.0)[..., None]

  train_x, train_y = prepare(data['train_images']), data['train_labels'].astype(np.int32)
  test_x, test_y = prepare(data['test_images']), data['test_labels']

  model = LinenCNN()
  params = model.init(jax.random.key(0), test_x[:1])['params']
  dense, _ = train(model, params, optax.adam(1e-3), train_x, train_y, args.epochs, 0)
  steps = args.epochs * (len(train_x) // 128)
  tx = compress.pruning(optax.adam(5e-4), compress.magnitude_pruner(
      compress.cubic_sparsity_schedule(0.0, 0.9, 0, int(steps * 0.7))), update_every=50)
  pruned, opt_state = train(model, dense, tx, train_x, train_y, args.epochs, 1)
  pruned = compress.apply_masks(pruned, compress.final_masks(opt_state))
  # Static convolutions (onnxruntime's QLinearConv), calibrated on training images; the
  # dense layers dynamic int8.
  rules = [compress.Rule('Conv_.*', mode='static'), compress.Rule('.*', mode='dynamic')]
  calibration = [train_x[i:i + 1000] for i in range(0, 5000, 1000)]
  quantized = compress.quantize_linen(model, pruned, rules, test_x[:1])
  scales = compress.calibrate_linen(model, pruned, rules, calibration)
  apply_int8 = compress.quantized_apply(model, rules, scales)

  def float_fn(p, x):
    return model.apply({'params': p}, x)

  def int8_fn(p, x):
    return apply_int8({'params': p}, x)


  report = {'sparsity': compress.sparsity_report(pruned)['overall']['sparsity']}
  report['accuracy_dense'] = accuracy(jax.jit(lambda x: float_fn(dense, x)), test_x, test_y)[0]
  report['accuracy_pruned_int8'] = accuracy(
      jax.jit(lambda x: int8_fn(quantized, x)), test_x, test_y)[0]
  saved_dense = dnnr_jax.save_params(args.out / 'dense', dense, overwrite=True)
  saved = dnnr_jax.save_params(args.out / 'pruned_int8', quantized, overwrite=True)
  report['bytes'] = {'dense': saved_dense.bytes_on_disk, 'pruned_int8': saved.bytes_on_disk,
                     'ratio': saved_dense.bytes_on_disk / saved.bytes_on_disk}
  exported = {}
  for name, fn, weights in (('float', float_fn, pruned), ('int8', int8_fn, quantized)):
    path, check = dnnr_jax.export_onnx_function(
        args.out / f'cnn_{name}.onnx', fn, weights, test_x[:256], check_inputs=test_x,
        overwrite=True)
    exported[name] = path
    report[f'onnx_{name}_check_on_test_set'] = check

  nnx_model = NnxCNN(nnx.Rngs(0))
  graphdef, state = nnx.split(nnx_model)
  state.replace_by_pure_dict(pruned)  # Same layer names: the trained weights, through NNX.
  nnx_float = nnx.merge(graphdef, state)
  nnx_int8 = compress.quantize_nnx(nnx_float, rules,
                                   compress.calibrate_nnx(nnx_float, rules, calibration))
  nnx_graph, nnx_state = nnx.split(nnx_int8)

  def nnx_fn(nnx_params, x):
    return nnx.merge(nnx_graph, nnx_params)(x)

  report['nnx_accuracy_pruned_int8'], nnx_logits = accuracy(
      jax.jit(lambda x: nnx_fn(nnx_state, x)), test_x, test_y)
  exported['nnx_int8'], check = dnnr_jax.export_onnx_function(
      args.out / 'cnn_nnx_int8.onnx', nnx_fn, nnx_state, test_x[:256], check_inputs=test_x,
      overwrite=True)
  report['nnx_onnx_int8_check_on_test_set'] = check
  report['nnx_equals_linen_int8'] = bool(np.array_equal(
      nnx_logits, accuracy(jax.jit(lambda x: int8_fn(quantized, x)), test_x, test_y)[1]))
  speed = serving_speed(exported, test_x)  # Linen float, Linen int8, NNX int8 side by side
  report['onnxruntime'] = {**speed, **{f'{name}_vs_float': {
      'throughput_batch256': speed[name]['throughput'] / speed['float']['throughput'],
      'latency_batch1': speed[name]['latency_us'] / speed['float']['latency_us']}
      for name in ('int8', 'nnx_int8')}}
  report['machine'] = {**machine(), 'onnxruntime': onnxruntime.__version__}
  print(json.dumps(report, indent=1, default=str))


if __name__ == '__main__':
  main()
