"""The accuracy guard of `dnnr prune` and `dnnr quantize`: the validation drop, and its verdict.

Every compression job evaluates its source and its result on the validation
split; `accuracy_guard` turns those two evaluations into the drop in
percentage points and, against the job's `max_drop` (`compress.max_drop`),
into `over_budget`. `warn` says, once, what went wrong and what to do: the
result is over budget (for gradual pruning, with the length of its recovery
phase), or the source has no validation split to judge by.
"""

from __future__ import annotations

import pathlib
import warnings
from typing import Any

from dnnr_jax.config import check_max_drop
from dnnr_jax.errors import AccuracyWarning

# What to try when a result is over its accuracy budget.
GUARD_FIXES = {
    'pruned': 'fine-tune longer (compress.prune.finetune_epochs) or prune less '
              '(compress.prune.sparsity)',
    'quantized': 'quantize to 8 bits (compress.quantize.bits) or fine-tune with '
                 'compress.quantize.mode qat',
}


def accuracy_guard(metrics: dict[str, Any], max_drop: float | None) -> dict[str, Any]:
  """The validation drop of a compression job in percentage points, and its verdict.

  Args:
    metrics: 'validation_before' and 'validation' (evaluation records), or
      neither when the data has no validation split.
    max_drop: the budget in percentage points; None only reports the drop.

  Returns:
    {'split', 'accuracy_before', 'accuracy', 'drop_pp', 'max_drop_pp',
    'over_budget'}; without a validation split the figures are None and
    'over_budget' False.
  """
  if 'validation' not in metrics:
    return {'split': None, 'accuracy_before': None, 'accuracy': None, 'drop_pp': None,
            'max_drop_pp': max_drop, 'over_budget': False}
  before = metrics['validation_before']['accuracy']
  after = metrics['validation']['accuracy']
  drop = 100.0 * (before - after)
  # Accuracies are counts over the split: a drop equal to the budget is within it.
  over = max_drop is not None and drop > max_drop + 1e-9
  return {'split': 'validation', 'accuracy_before': before, 'accuracy': after, 'drop_pp': drop,
          'max_drop_pp': max_drop, 'over_budget': over}


def check(max_drop: float | None) -> None:
  """Rejects a budget that is not None or a finite number of percentage points >= 0."""
  if max_drop is not None:
    check_max_drop(max_drop, 'max_drop')


def warn(verdict: dict[str, Any], path: pathlib.Path, kind: str,
         recorded: dict[str, Any]) -> None:
  """Warns when the verdict cannot judge (no validation split) or is over budget.

  Args:
    verdict: `accuracy_guard`'s result.
    path: the checkpoint written.
    kind: 'pruned' or 'quantized', for the fix it suggests.
    recorded: the job's `compression` record ('pruning_end_step' and
      'finetune_steps' for gradual pruning).
  """
  if verdict['split'] is None:
    accuracy_warning(
        f'{path.name} was not checked against an accuracy budget: its source has no '
        'validation split; retrain with data.validation_size > 0 to have every prune and '
        'quantize checked on validation.')
  elif verdict['over_budget']:
    why = ''
    if 'pruning_end_step' in recorded:  # Gradual: how long the recovery phase was.
      end, steps = recorded['pruning_end_step'], recorded['finetune_steps']
      why = (f': gradual pruning reached its sparsity at step {end} of {steps}, leaving '
             f'{steps - end} steps at that sparsity to recover')
    accuracy_warning(
        f"{path.name} lost {verdict['drop_pp']:.2f} pp of validation accuracy "
        f"({verdict['accuracy_before']:.2%} -> {verdict['accuracy']:.2%}), over the budget "
        f"compress.max_drop = {verdict['max_drop_pp']:g} pp{why}; {GUARD_FIXES[kind]}.")


def accuracy_warning(message: str) -> None:
  """Issues `message` as an `AccuracyWarning` (the CLI prints it as `warning: ...`)."""
  warnings.warn(message, AccuracyWarning, stacklevel=3)
