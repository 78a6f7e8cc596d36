"""Which ONNX form of an int8 convolution onnxruntime runs faster than the float `Conv`.

Builds the CNN of `scripts/compress_cnn.py` (Conv 32 3x3/2 -> Conv 64 3x3/2 ->
Dense 128 -> Dense 10, NHWC input [B, 28, 28, 1]) by hand in several forms,
from the same seeded weights, and times them side by side at batch 256 and 1
(`dnnr_jax.jobs.timing.compare_inference`). The dense head is the same
float `Gemm`s in every form, so the ratios are those of the convolutions:

  float:        Conv + Relu, twice (onnxruntime runs them in its NCHWc layout).
  conv_integer: static uint8 codes, `ConvInteger` (u8 x s8) -> Cast -> Mul ->
                Add -> Relu -> QuantizeLinear, twice: what
                `onnxruntime.quantization.quantize_dynamic` emits for a Conv.
  qlinear:      QuantizeLinear -> `QLinearConv` (activation zero point 0, so the
                saturation is the ReLU) twice -> DequantizeLinear. Its 8-bit
                weights are uint8 codes + 128 with zero point 128, as `dnnr
                export` writes them: onnxruntime's AVX2-only uint8 x int8 kernel
                adds pairs of products in int16, which 2 * 255 * 127 saturates.
  qdq:          the same as QuantizeLinear/DequantizeLinear pairs around float
                Convs, which onnxruntime's QDQ transformer fuses to QLinearConv.
  qlinear_int_head: `qlinear` with the dense head as MatMulInteger as well.
  float_conv1_qlinear_conv2: the one-channel first convolution as the float
                Conv + Relu, QuantizeLinear, the second as QLinearConv; the
                dense head as MatMulInteger.

Further ONNX files with an input [B, 28, 28, 1] (e.g. `compress_cnn.py`'s
cnn_float.onnx and cnn_int8.onnx) are timed in the same rounds. Every built
file passes `onnx.checker.check_model(full_check=True)`; `qlinear_exact`
says whether onnxruntime's two QLinearConvs equal the NumPy reference
`clip(round_half_even(float32(acc + bias) * float32(x_scale * w_scale /
y_scale)), 0, 255)` on every output of the batch.

  PYTHONPATH=. python scripts/conv_forms.py --data-dir MNIST_DIR [--out DIR] [more.onnx ...]
"""

import argparse
import json
import pathlib
import tempfile

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from dnnr_jax.io.data import load_mnist_arrays
from dnnr_jax.jobs.timing import compare_inference, machine

CONV = {'strides': [2, 2], 'pads': [0, 0, 1, 1]}  # Flax 'SAME' for 28 -> 14 -> 7.


def weights(seed=0):
  """Seeded float weights, their int8 codes (per output channel) and activation scales
  calibrated on random images (ReLU outputs over 255 codes, zero point 0)."""
  rng = np.random.default_rng(seed)
  w = {'w1': rng.normal(size=(32, 1, 3, 3)) * 0.3, 'b1': rng.normal(size=32) * 0.1,
       'w2': rng.normal(size=(64, 32, 3, 3)) * 0.05, 'b2': rng.normal(size=64) * 0.1,
       'd1': rng.normal(size=(3136, 128)) * 0.02, 'c1': rng.normal(size=128) * 0.1,
       'd2': rng.normal(size=(128, 10)) * 0.1, 'c2': rng.normal(size=10) * 0.1}
  w = {k: v.astype(np.float32) for k, v in w.items()}
  for i in ('1', '2'):
    scale = np.abs(w['w' + i]).reshape(len(w['w' + i]), -1).max(1) / 127
    w['q' + i] = np.round(w['w' + i] / scale[:, None, None, None]).astype(np.int8)
    w['s' + i] = scale.astype(np.float32)
  a1, a2, _ = reference(w, rng.random((64, 28, 28, 1), dtype=np.float32))
  w['sx'] = np.float32(1 / 255)
  w['sy1'], w['sy2'] = np.float32(a1.max() / 255), np.float32(a2.max() / 255)
  w['bq1'] = np.round(w['b1'] / (w['sx'] * w['s1'])).astype(np.int32)
  w['bq2'] = np.round(w['b2'] / (w['sy1'] * w['s2'])).astype(np.int32)
  w['zu'] = np.uint8(0)
  for i, size in (('1', 32), ('2', 64)):  # u8u8 forms: exact on every CPU
    w['p' + i] = (w['q' + i].astype(np.int16) + 128).astype(np.uint8)
    w['zp' + i] = np.full(size, 128, np.uint8)
  w['flat_shape'] = np.array([0, -1], np.int64)
  dscale = np.abs(w['d1']).max(0) / 127
  w['dq'] = np.round(w['d1'] / dscale).astype(np.int8)
  w['ds'] = (dscale * w['sy2']).astype(np.float32)
  w['m1'] = (w['sx'] * w['s1']).astype(np.float32)
  w['m2'] = (w['sy1'] * w['s2']).astype(np.float32)
  return w


def conv(x, kernel):
  """[B, H, W, I] convolved with [O, I, 3, 3], stride 2, pads (0, 1): [B, H/2, W/2, O]."""
  padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  size = x.shape[1]
  windows = np.concatenate([padded[:, i:i + size:2, j:j + size:2] for i in range(3)
                            for j in range(3)], -1)  # taps, then channels
  return windows @ kernel.transpose(2, 3, 1, 0).reshape(-1, len(kernel))


def reference(w, images):
  """The float network in NumPy: both ReLU activations and the logits."""
  a1 = np.maximum(conv(images, w['w1']) + w['b1'], 0)
  a2 = np.maximum(conv(a1, w['w2']) + w['b2'], 0)
  hidden = np.maximum(a2.reshape(len(a2), -1) @ w['d1'] + w['c1'], 0)
  return a1, a2, hidden @ w['d2'] + w['c2']


def node(op, inputs, outputs, **attributes):
  return helper.make_node(op, inputs, outputs if isinstance(outputs, list) else [outputs],
                          **attributes)


def float_head(x):
  return [node('Transpose', [x], 'hwc', perm=[0, 2, 3, 1]),
          node('Reshape', ['hwc', 'flat_shape'], 'flat'),
          node('Gemm', ['flat', 'd1', 'c1'], 'g1'), node('Relu', ['g1'], 'r1'),
          node('Gemm', ['r1', 'd2', 'c2'], 'out')]


def int_head(x):
  return [node('Transpose', [x], 'hwc', perm=[0, 2, 3, 1]),
          node('Reshape', ['hwc', 'flat_shape'], 'flat8'),
          node('MatMulInteger', ['flat8', 'dq', 'zu'], 'acc'),
          node('Cast', ['acc'], 'accf', to=TensorProto.FLOAT), node('Mul', ['accf', 'ds'], 'g1s'),
          node('Add', ['g1s', 'c1'], 'g1'), node('Relu', ['g1'], 'r1'),
          node('Gemm', ['r1', 'd2', 'c2'], 'out')]


def forms():
  """{name: [nodes]}, every one reading 'input' [B, 28, 28, 1] and writing 'out'."""
  first = [node('Transpose', ['input'], 'nchw', perm=[0, 3, 1, 2])]
  float_convs = first + [node('Conv', ['nchw', 'w1', 'b1'], 'y1', **CONV),
                         node('Relu', ['y1'], 'a1'),
                         node('Conv', ['a1', 'w2', 'b2'], 'y2', **CONV), node('Relu', ['y2'], 'a2')]
  qlinear_convs = first + [
      node('QuantizeLinear', ['nchw', 'sx', 'zu'], 'x0'),
      node('QLinearConv', ['x0', 'sx', 'zu', 'p1', 's1', 'zp1', 'sy1', 'zu', 'bq1'], 'u1', **CONV),
      node('QLinearConv', ['u1', 'sy1', 'zu', 'p2', 's2', 'zp2', 'sy2', 'zu', 'bq2'], 'u2',
           **CONV)]
  integer = first + [node('QuantizeLinear', ['nchw', 'sx', 'zu'], 'x0')]
  qdq = first + [node('QuantizeLinear', ['nchw', 'sx', 'zu'], 'x0')]
  for i, (x, scale) in enumerate((('x0', 'sx'), ('u1', 'sy1')), start=1):
    integer += [node('ConvInteger', [x, f'q{i}', 'zu'], f'i{i}', **CONV),
                node('Cast', [f'i{i}'], f'f{i}', to=TensorProto.FLOAT),
                node('Mul', [f'f{i}', f'm{i}_nchw'], f'k{i}'),
                node('Add', [f'k{i}', f'b{i}_nchw'], f'h{i}'), node('Relu', [f'h{i}'], f'cr{i}'),
                node('QuantizeLinear', [f'cr{i}', f'sy{i}', 'zu'], f'u{i}')]
    qdq += [node('DequantizeLinear', [x, scale, 'zu'], f'dx{i}'),
            node('DequantizeLinear', [f'p{i}', f's{i}', f'zp{i}'], f'dw{i}', axis=0),
            node('DequantizeLinear', [f'bq{i}', f'sb{i}'], f'db{i}', axis=0),
            node('Conv', [f'dx{i}', f'dw{i}', f'db{i}'], f'qc{i}', **CONV),
            node('Relu', [f'qc{i}'], f'cr{i}'),
            node('QuantizeLinear', [f'cr{i}', f'sy{i}', 'zu'], f'u{i}')]
  dequantized = [node('DequantizeLinear', ['u2', 'sy2', 'zu'], 'a2')]
  hybrid = float_convs[:3] + [
      node('QuantizeLinear', ['a1', 'sy1', 'zu'], 'u1'),
      node('QLinearConv', ['u1', 'sy1', 'zu', 'p2', 's2', 'zp2', 'sy2', 'zu', 'bq2'], 'u2',
           **CONV)]
  return {'float': float_convs + float_head('a2'),
          'conv_integer': integer + dequantized + float_head('a2'),
          'qlinear': qlinear_convs + dequantized + float_head('a2'),
          'qdq': qdq + dequantized + float_head('a2'),
          'qlinear_int_head': qlinear_convs + int_head('u2'),
          'float_conv1_qlinear_conv2': hybrid + int_head('u2')}


def build(nodes, w):
  used = {name for n in nodes for name in n.input}
  extra = {'m1_nchw': w['m1'].reshape(1, -1, 1, 1), 'm2_nchw': w['m2'].reshape(1, -1, 1, 1),
           'b1_nchw': w['b1'].reshape(1, -1, 1, 1), 'b2_nchw': w['b2'].reshape(1, -1, 1, 1),
           'sb1': w['m1'], 'sb2': w['m2']}
  inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in {**w, **extra}.items()
           if k in used]
  graph = helper.make_graph(
      nodes, 'cnn', [helper.make_tensor_value_info('input', TensorProto.FLOAT, ['B', 28, 28, 1])],
      [helper.make_tensor_value_info('out', TensorProto.FLOAT, ['B', 10])], inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)])
  model.ir_version = 10
  onnx.checker.check_model(model, full_check=True)
  return model


def qlinear_codes(w, images):
  """onnxruntime's uint8 outputs of both QLinearConvs [B, O, H, W] (one input channel,
  then 32), from QuantizeLinear(images)."""
  nodes = [node('Transpose', ['input'], 'nchw', perm=[0, 3, 1, 2]),
           node('QuantizeLinear', ['nchw', 'sx', 'zu'], 'x0'),
           node('QLinearConv', ['x0', 'sx', 'zu', 'p1', 's1', 'zp1', 'sy1', 'zu', 'bq1'], 'u1',
                **CONV),
           node('QLinearConv', ['u1', 'sy1', 'zu', 'p2', 's2', 'zp2', 'sy2', 'zu', 'bq2'], 'u2',
                **CONV)]
  graph = helper.make_graph(
      nodes, 'conv', [helper.make_tensor_value_info('input', TensorProto.FLOAT, ['B', 28, 28, 1])],
      [helper.make_tensor_value_info('u1', TensorProto.UINT8, ['B', 32, 14, 14]),
       helper.make_tensor_value_info('u2', TensorProto.UINT8, ['B', 64, 7, 7])],
      [numpy_helper.from_array(np.asarray(w[k]), k)
       for k in ('sx', 'zu', 'p1', 's1', 'zp1', 'sy1', 'bq1', 'p2', 's2', 'zp2', 'sy2', 'bq2')])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)])
  model.ir_version = 10
  onnx.checker.check_model(model, full_check=True)
  session = onnxruntime.InferenceSession(model.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  return session.run(None, {'input': images})


def qlinear_exact(w, images):
  """Whether `qlinear_codes` equal the NumPy requantization reference, every code."""
  got = qlinear_codes(w, images)
  codes = np.clip(np.round(images / w['sx']), 0, 255).astype(np.int64)
  exact = True
  for i, (x_scale, y_scale) in enumerate(((w['sx'], w['sy1']), (w['sy1'], w['sy2'])), start=1):
    acc = conv(codes, w[f'q{i}'].astype(np.int64)) + w[f'bq{i}']
    multiplier = (x_scale * w[f's{i}']) / y_scale  # float32 throughout, as onnxruntime
    codes = np.clip(np.round(acc.astype(np.float32) * multiplier), 0, 255).astype(np.int64)
    exact = exact and np.array_equal(got[i - 1], codes.transpose(0, 3, 1, 2))
  return bool(exact)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('files', nargs='*', type=pathlib.Path)
  parser.add_argument('--data-dir', required=True)
  parser.add_argument('--out', type=pathlib.Path, default=None)
  parser.add_argument('--seconds', type=float, default=3.0)
  args = parser.parse_args()
  directory = args.out or pathlib.Path(tempfile.mkdtemp())
  directory.mkdir(parents=True, exist_ok=True)
  images = load_mnist_arrays(args.data_dir)['test_images'][:256].astype(np.float32) / 255.0
  images = images.reshape(-1, 28, 28, 1)
  w = weights()
  paths = {}
  for name, nodes in forms().items():
    paths[name] = directory / f'{name}.onnx'
    onnx.save(build(nodes, w), paths[name])
  paths.update({path.name: path for path in args.files})
  sessions = {name: onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
              for name, path in paths.items()}
  runners = {name: (lambda rows, session=session: session.run(None, {'input': rows}))
             for name, session in sessions.items()}
  speeds = compare_inference(runners, images, args.seconds)
  base = speeds['float']
  print(json.dumps({
      'machine': {**machine(), 'onnxruntime': onnxruntime.__version__},
      'qlinear_exact': qlinear_exact(w, images),
      'forms': {name: {**speed, 'throughput_vs_float': speed['throughput'] / base['throughput'],
                       'latency_vs_float': speed['latency_us'] / base['latency_us']}
                for name, speed in speeds.items()}}, indent=1))


if __name__ == '__main__':
  main()
