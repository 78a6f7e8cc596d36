"""The pipeline report's PNG plots, drawn with matplotlib from report.json's data.

Each function takes the report dictionary and a path, draws one figure and
writes it (via a temporary file, so a crash never leaves half a PNG);
`write_all` draws those the report has data for.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import matplotlib

matplotlib.use('Agg')  # Files only; never a window.
import matplotlib.pyplot as plt  # noqa: E402

_SUMMARY_KEYS = ('overall', 'all_params')


def training_curves(report: dict[str, Any], path: pathlib.Path) -> None:
  """Loss and accuracy per epoch, train and test."""
  history, epochs, figure, (loss, accuracy) = _history_panels(report)
  for split in ('train', 'test'):
    loss.plot(epochs, [record[split]['loss'] for record in history], label=split)
    accuracy.plot(epochs, [record[split]['accuracy'] for record in history], label=split)
  loss.set(xlabel='epoch', ylabel='cross-entropy', title='Loss')
  accuracy.set(xlabel='epoch', ylabel='accuracy', title='Accuracy')
  _save(figure, path, legends=(loss, accuracy))


def thresholds_and_routes(report: dict[str, Any], path: pathlib.Path) -> None:
  """The hybrid thresholds and the deep-path fraction per epoch."""
  history, epochs, figure, (thresholds, routes) = _history_panels(report)
  for name in history[0]['thresholds']:
    thresholds.plot(epochs, [record['thresholds'][name] for record in history], label=name)
  for split in ('train', 'test'):
    routes.plot(epochs, [record[split]['deep_fraction'] for record in history], label=split)
  thresholds.set(xlabel='epoch', ylabel='threshold', title='Hybrid thresholds')
  routes.set(xlabel='epoch', ylabel='fraction of inputs', title='Deep-path fraction',
             ylim=(-0.02, 1.02))
  _save(figure, path, legends=(thresholds, routes))


def sparsity_per_layer(report: dict[str, Any], path: pathlib.Path) -> None:
  """Fraction of zero weights in each pruned kernel, and overall."""
  layers = report['sparsity_report']
  names = [name for name in layers if name not in _SUMMARY_KEYS] + ['overall']
  figure, axes = plt.subplots(figsize=(7, 4))
  bars = axes.bar(names, [layers[name]['sparsity'] for name in names], color='tab:blue')
  bars[-1].set_color('tab:orange')
  axes.bar_label(bars, labels=[f"{layers[name]['sparsity']:.1%}" for name in names])
  axes.set(ylabel='sparsity', title='Sparsity per layer (pruned model)', ylim=(0, 1.1))
  axes.tick_params(axis='x', rotation=30)
  _save(figure, path)


def accuracy_against_sparsity(report: dict[str, Any], path: pathlib.Path) -> None:
  """Test accuracy of each sweep model, the dense model at sparsity 0."""
  points = sorted((item['measured_sparsity'], item['test_accuracy']) for item in report['sweep'])
  points.insert(0, (0.0, report['final_test_accuracy']))
  figure, axes = plt.subplots(figsize=(6, 4))
  axes.plot([x for x, _ in points], [y for _, y in points], marker='o')
  axes.set(xlabel='sparsity of the pruned kernels', ylabel='test accuracy',
           title='Accuracy against sparsity (one fine-tuned model each)')
  axes.grid(alpha=0.3)
  _save(figure, path)


def accuracy_against_compute(curve: dict[str, Any], path: pathlib.Path) -> None:
  """Test accuracy against mean multiply-adds per sample, per router; static baselines too.

  `curve` is `jobs.dynamic.accuracy_against_compute`'s result.
  """
  figure, axes = plt.subplots(figsize=(6.5, 4))
  for router in sorted({row['router'] for row in curve['rows']}):
    rows = sorted((row['test']['compute_fraction'], row['test']['accuracy'])
                  for row in curve['rows'] if row['router'] == router)
    axes.plot([x for x, _ in rows], [y for _, y in rows], marker='o', label=f'{router} router')
  for name, baseline in curve['baselines'].items():
    axes.scatter([baseline['compute_fraction']], [baseline['test_accuracy']], marker='s',
                 zorder=3, label=f"{name.replace('_', ' ')} (static)")
  axes.set(xlabel='mean multiply-adds per sample (fraction of always-deep)',
           ylabel='test accuracy', title='Accuracy against compute (thresholds from validation)')
  axes.legend()
  axes.grid(alpha=0.3)
  _save(figure, path)


def bytes_against_accuracy(report: dict[str, Any], path: pathlib.Path) -> None:
  """`dnnr compress`'s trials: bytes on disk against validation accuracy, the budget's floor."""
  figure, axes = plt.subplots(figsize=(6.5, 4))
  trials = report['trials']
  for bits in sorted({trial['bits'] for trial in trials}):
    chosen = [trial for trial in trials if trial['bits'] == bits]
    axes.scatter([trial['bytes'] for trial in chosen],
                 [trial['validation_accuracy'] for trial in chosen],
                 label=f'{bits}-bit' if bits else 'float', zorder=3)
  front = [trial for trial in sorted(trials, key=lambda trial: trial['bytes'])
           if trial['path'] in report['pareto']]
  axes.step([trial['bytes'] for trial in front], [trial['validation_accuracy'] for trial in front],
            where='post', color='grey', alpha=0.6, label='Pareto front')
  floor = report['source_validation_accuracy'] - report['settings']['max_drop'] / 100
  axes.axhline(floor, color='red', linestyle='--', label='budget')
  chosen = report['chosen']
  axes.scatter([chosen['bytes']], [chosen['validation_accuracy']], s=150, facecolors='none',
               edgecolors='black', zorder=4, label='chosen')
  axes.set_xscale('log')
  axes.set(xlabel='bytes on disk', ylabel='validation accuracy',
           title='Compression trials (chosen on validation)')
  _save(figure, path, [axes])


def write_all(report: dict[str, Any], directory: pathlib.Path) -> dict[str, str]:
  """Draws every plot the report has data for; returns {name: file name}."""
  plots = {}
  if report.get('history'):
    plots['training curves'] = ('training.png', training_curves)
    plots['thresholds and deep-path fraction'] = ('thresholds.png', thresholds_and_routes)
  if report.get('sparsity_report'):
    plots['sparsity per layer'] = ('sparsity.png', sparsity_per_layer)
  if report.get('sweep'):
    plots['accuracy against sparsity'] = ('sweep.png', accuracy_against_sparsity)
  if (report.get('dynamic') or {}).get('curve'):
    plots['accuracy against compute'] = (
        'compute.png', lambda report, path: accuracy_against_compute(
            report['dynamic']['curve'], path))
  for file_name, draw in plots.values():
    draw(report, directory / file_name)
  return {name: file_name for name, (file_name, _) in plots.items()}


def _history_panels(report: dict[str, Any]):
  """The training history, its epochs, and a figure with two axes side by side."""
  history = report['history']
  figure, axes = plt.subplots(1, 2, figsize=(10, 4))
  return history, [record['epoch'] for record in history], figure, axes


def _save(figure, path: pathlib.Path, legends=()) -> None:
  """Writes `figure`, after a legend and a grid on each of the `legends` axes."""
  for axes in legends:
    axes.legend()
    axes.grid(alpha=0.3)
  figure.tight_layout()
  temporary = path.with_name(f'.{path.name}.partial')
  figure.savefig(temporary, format='png', dpi=100)
  plt.close(figure)
  os.replace(temporary, path)
