"""`dnnr compress`'s report: every trial as a table, and a Pareto plot of bytes and accuracy.

`write(result, settings)` writes report.json, report.md and pareto.png into the
search folder (`BudgetResult.report_dir`), each whole or not at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dnnr_jax.config import BudgetConfig
from dnnr_jax.jobs.report import write_json, write_text


def write(result, settings: BudgetConfig) -> dict[str, Any]:
  """Writes the search's report files; returns report.json's contents."""
  from dnnr_jax.io import plots

  report = {
      'settings': dataclasses.asdict(settings),
      'source': str(result.source_path),
      'source_validation_accuracy': result.source_validation_accuracy,
      'trials': [dataclasses.asdict(trial) for trial in result.trials],
      'pareto': [trial.path for trial in pareto_front(result.trials)],
      'chosen': {**dataclasses.asdict(result.chosen), 'written_to': str(result.path),
                 'test_accuracy': result.test_accuracy,
                 'source_test_accuracy': result.source_test_accuracy,
                 'bytes_on_disk': result.size.raw,
                 'dense_float_bytes': result.dense_float_size.raw,
                 'smaller_than_dense': result.smaller_than_dense},
  }
  result.report_dir.mkdir(parents=True, exist_ok=True)
  plots.bytes_against_accuracy(report, result.report_dir / 'pareto.png')
  write_json(result.report_dir / 'report.json', report)
  write_text(result.report_dir / 'report.md', markdown(report))
  return report


def pareto_front(trials):
  """The trials no other trial beats in both bytes and validation accuracy, fewest bytes first."""
  front, best = [], -1.0
  for trial in sorted(trials, key=lambda trial: (trial.bytes, -trial.validation_accuracy)):
    if trial.validation_accuracy > best:
      front.append(trial)
      best = trial.validation_accuracy
  return front


def markdown(report: dict[str, Any]) -> str:
  """The trials table, the chosen model and the plot, as Markdown."""
  settings, chosen = report['settings'], report['chosen']
  lines = [
      f"# dnnr compress: {report['source']}", '',
      f"Budget: at most {settings['max_drop']:g} pp below the source's validation accuracy "
      f"({report['source_validation_accuracy']:.2%}); {settings['method']} pruning, "
      f"{settings['finetune_epochs']} fine-tuning epochs per sparsity, "
      f"{settings['quantize_mode']} quantization"
      + (f" ({settings['activations']} activations)" if settings.get('activations') else '')
      + '. Every choice is made on validation.', '',
      '| sparsity | bits | bytes | validation accuracy | drop (pp) | within budget | Pareto |',
      '| ---: | ---: | ---: | ---: | ---: | :---: | :---: |',
  ]
  for trial in report['trials']:
    within = trial['drop_pp'] <= settings['max_drop'] + 1e-9
    lines.append(
        f"| {trial['sparsity']:.1%} | {trial['bits'] or 'float'} | {trial['bytes']:,} "
        f"| {trial['validation_accuracy']:.2%} | {trial['drop_pp']:.2f} "
        f"| {'yes' if within else 'no'} | {'yes' if trial['path'] in report['pareto'] else ''} |")
  lines += [
      '', f"Chosen: sparsity {chosen['sparsity']:.1%}, {chosen['bits'] or 'float'} bits, "
      f"{chosen['bytes_on_disk']:,} bytes ({chosen['smaller_than_dense']:.1f}x fewer than the "
      f"dense float32 checkpoint's {chosen['dense_float_bytes']:,}), written to "
      f"`{chosen['written_to']}`. Test accuracy (reported, not used to choose): "
      f"{chosen['test_accuracy']:.2%} (source {chosen['source_test_accuracy']:.2%}).",
      '', '![bytes against validation accuracy](pareto.png)']
  return '\n'.join(lines) + '\n'
