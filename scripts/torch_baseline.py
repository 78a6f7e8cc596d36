"""A plain eager PyTorch training loop of the original model, for comparison.

Not part of dnnr_jax (PyTorch is not a dependency): run it in an environment
with torch installed, e.g. `pip install torch numpy`, then

  python scripts/torch_baseline.py [--batch-sizes 64 128] [--steps 400]

It trains the original's DynamicNeuralNetwork step (analyzer on the batch,
one route per batch from batch means against 0.5, Linear 784-256-256, deep
block or shortcut, head; Adam lr 1e-3, cross-entropy) on random tensors held
in memory, so no data loading is timed, and prints samples/s after warm-up
as the median of five timed runs.
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn


class DynamicNeuralNetwork(nn.Module):
  def __init__(self):
    super().__init__()
    self.trunk = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
    self.deep = nn.Sequential(nn.Linear(256, 128), nn.ReLU())
    self.shortcut = nn.Linear(256, 128)
    self.head = nn.Linear(128, 10)

  def forward(self, x, deep):
    h = self.trunk(x)
    return self.head(self.deep(h) if deep else self.shortcut(h))


def analyze(x):
  variance = x.var(dim=1, unbiased=True)
  p = torch.softmax(x, dim=1)
  entropy = -(p * torch.log(p + 1e-10)).sum(dim=1)
  sparsity = (x.abs() < 0.1).float().mean(dim=1)
  return variance, entropy, sparsity


def throughput(batch_size, steps):
  torch.manual_seed(0)
  model = DynamicNeuralNetwork()
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  loss_fn = nn.CrossEntropyLoss()
  images = torch.randn(steps * batch_size, 784)
  labels = torch.randint(0, 10, (steps * batch_size,))

  def run():
    for step in range(steps):
      x = images[step * batch_size:(step + 1) * batch_size]
      y = labels[step * batch_size:(step + 1) * batch_size]
      variance, entropy, sparsity = analyze(x)
      deep = bool(variance.mean() > 0.5 and entropy.mean() > 0.5
                  and not sparsity.mean() > 0.5)
      optimizer.zero_grad()
      loss = loss_fn(model(x, deep), y)
      loss.backward()
      optimizer.step()

  run()  # warm-up
  seconds = []
  for _ in range(5):
    start = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - start)
  return steps * batch_size / statistics.median(seconds)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch-sizes', type=int, nargs='+', default=[64, 128])
  parser.add_argument('--steps', type=int, default=400)
  args = parser.parse_args()
  results = {'torch': torch.__version__, 'threads': torch.get_num_threads(),
             'throughput': {}}
  for batch_size in args.batch_sizes:
    results['throughput'][batch_size] = throughput(batch_size, args.steps)
    print(f'batch {batch_size}: {results["throughput"][batch_size]:,.0f} samples/s')
  print(json.dumps(results))


if __name__ == '__main__':
  main()
