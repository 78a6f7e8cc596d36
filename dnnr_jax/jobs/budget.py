"""`dnnr compress`: the smallest model whose validation accuracy is within a budget.

The search (`compress_to_budget`, settings `BudgetConfig`: a config's
`compress.budget`) climbs a ladder of sparsities. Each rung prunes the source
gradually (LAMP or global magnitude scores, the source's `compress.prune`
recipe for distillation, augmentation and rate), then quantizes that pruned
model to each bit width asked (QAT with the source's `compress.quantize`
distillation and augmentation, and its activations unless the budget names
them); every trial is judged on the validation split only. Climbing stops at
the first rung whose trials all miss the budget. Of the trials within it, the
one with the fewest bytes on disk is written as a new versioned checkpoint
under `<models>/pruned/` or `<models>/quantized/`; its test accuracy is the
only test figure reported.

Trials are recorded in `<models>/budget/<source name>/trials.json`, keyed by
everything that makes them, beside their checkpoints: a rerun (after an
interrupt, or with another budget) reuses every finished trial. The same
folder gets report.md, report.json and pareto.png (bytes against validation
accuracy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Callable

from dnnr_jax.config import BudgetConfig
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import checkpoint as checkpoint_lib
from dnnr_jax.io import distributed, durable
from dnnr_jax.jobs import budget_report
from dnnr_jax.jobs import compress as compress_jobs
from dnnr_jax.jobs.results import Footprint

TRIALS_FILE = 'trials.json'
DEFAULT_BUDGET = BudgetConfig()
TrialCallback = Callable[['Trial', bool], None]  # (trial, reused)


@dataclasses.dataclass(frozen=True)
class Trial:
  """One candidate of the search, measured on validation.

  Attributes:
    sparsity: the pruned share of kernel weights.
    bits: 8, 7 or 4, or 0 for the pruned float model.
    path: its checkpoint (in the search folder).
    bytes: bytes of that checkpoint on disk.
    validation_accuracy: its accuracy on the validation split.
    drop_pp: the source's validation accuracy minus it, in percentage points.
  """
  sparsity: float
  bits: int
  path: str
  bytes: int
  validation_accuracy: float
  drop_pp: float

  def within(self, max_drop: float) -> bool:
    return self.drop_pp <= max_drop + 1e-9  # Accuracies are counts: equal is within.

  @property
  def label(self) -> str:
    return f"sparsity {self.sparsity:.1%}, {f'{self.bits}-bit' if self.bits else 'float'}"


@dataclasses.dataclass(frozen=True)
class BudgetResult:
  """What `compress_to_budget` chose and wrote.

  Attributes:
    path: the chosen model's new checkpoint.
    chosen: its trial.
    trials: every trial, in the order run.
    source_path: the source checkpoint; source_validation_accuracy: its
      validation accuracy.
    test_accuracy, source_test_accuracy: the chosen model's and the
      source's test accuracy (reported, never used to choose).
    size: the chosen checkpoint's bytes; dense_float_size: the dense float32
      checkpoint's at the root of the source's lineage.
    report_dir: the search folder (trials.json, report.md, pareto.png).
    ran, reused: trials run by this call and taken from an earlier one.
  """
  path: pathlib.Path
  chosen: Trial
  trials: list[Trial]
  source_path: pathlib.Path
  source_validation_accuracy: float
  test_accuracy: float
  source_test_accuracy: float
  size: Footprint
  dense_float_size: Footprint
  report_dir: pathlib.Path
  ran: int
  reused: int

  @property
  def smaller_than_dense(self) -> float:
    return self.dense_float_size.raw / self.size.raw

  def to_dict(self) -> dict[str, Any]:
    """The JSON summary `dnnr compress --json` prints."""
    return {'path': str(self.path), 'chosen': dataclasses.asdict(self.chosen),
            'trials': [dataclasses.asdict(trial) for trial in self.trials],
            'source': str(self.source_path),
            'source_validation_accuracy': self.source_validation_accuracy,
            'test_accuracy': self.test_accuracy,
            'source_test_accuracy': self.source_test_accuracy,
            'bytes': dataclasses.asdict(self.size),
            'dense_float_bytes': dataclasses.asdict(self.dense_float_size),
            'smaller_than_dense': self.smaller_than_dense,
            'report_dir': str(self.report_dir), 'ran': self.ran, 'reused': self.reused}


@durable.holding_locks
def compress_to_budget(
    path: str | os.PathLike, settings: BudgetConfig = DEFAULT_BUDGET, *,
    seed: int | None = None, data_dir=None, models_dir=None, version: str | None = None,
    overwrite: bool = False, on_trial: TrialCallback | None = None,
) -> BudgetResult:
  """Finds and writes the smallest model within `settings.max_drop` of `path` on validation.

  Args:
    path: the source checkpoint (final or pruned, float).
    settings: the budget, the pruning method, the sparsity ladder, the bit
      widths and the fine-tuning of each trial (see `BudgetConfig`); checked
      with `settings.validate()` before any work.
    seed: fine-tuning's shuffling seed; None keeps the source's.
    data_dir, models_dir, version, overwrite: as for `prune_checkpoint`; the
      version is of the chosen model, under pruned/ or quantized/.
    on_trial: called with each trial and whether it was reused.

  Returns:
    The chosen model, every trial and the search folder.

  Raises:
    DnnrError: bad settings, a source without a validation split, or no
      trial within the budget (naming the closest); no model is written then.
  """
  settings.validate()
  source_path = pathlib.Path(path).absolute()
  source = checkpoint_lib.load_model(source_path)
  if source.config.data.validation_size == 0:
    raise DnnrError(
        f'{source_path} was trained without a validation split (data.validation_size = 0), '
        'and the budget is judged on validation only; retrain with data.validation_size > 0.')
  if version is not None:
    checkpoint_lib.check_version(version)
  models_dir = pathlib.Path(models_dir) if models_dir else source_path.parent.parent
  report_dir = models_dir / 'budget' / source_path.name
  search = _Search(source, settings, seed, data_dir, report_dir, on_trial)
  for sparsity in settings.sparsities:
    if not any(trial.within(settings.max_drop) for trial in search.rung(sparsity)):
      break  # Sparser rungs lose more: the ladder stops at the first miss.
  candidates = [trial for trial in search.trials if trial.bits in settings.bits]
  within = [trial for trial in candidates if trial.within(settings.max_drop)]
  if not within:
    closest = min(candidates, key=lambda trial: trial.drop_pp)
    raise DnnrError(
        f'no candidate is within compress.budget.max_drop = {settings.max_drop:g} pp of '
        f'{source_path.name} on validation: the closest ({closest.label}) lost '
        f'{closest.drop_pp:.2f} pp at {closest.bytes:,} bytes; raise the budget or fine-tune '
        f'longer (compress.budget.finetune_epochs); the trials stay in {report_dir} for a '
        'rerun.')
  chosen = min(within, key=lambda trial: (trial.bytes, -trial.validation_accuracy))
  result = _write_chosen(source, chosen, search, models_dir, version, overwrite)
  distributed.on_primary('budget report', lambda: budget_report.write(result, settings))
  return result


@dataclasses.dataclass
class _Search:
  """The trials of one search, recorded in trials.json as each finishes."""
  source: Any
  settings: BudgetConfig
  seed: int | None
  data_dir: Any
  report_dir: pathlib.Path
  on_trial: TrialCallback | None
  trials: list[Trial] = dataclasses.field(default_factory=list)
  ran: int = 0
  reused: int = 0

  def __post_init__(self):
    self.file = self.report_dir / TRIALS_FILE
    self.records = json.loads(self.file.read_text()) if self.file.is_file() else {}

  def rung(self, sparsity: float) -> list[Trial]:
    """The pruned model at `sparsity` and its quantized versions, each run or reused."""
    budget = self.settings
    prune = dataclasses.replace(
        self.source.config.compress.prune, method=budget.method, sparsity=sparsity,
        schedule='gradual', finetune_epochs=budget.finetune_epochs)
    pruned = self._trial(sparsity, 0, {'prune': dataclasses.asdict(prune)},
                         lambda version: compress_jobs.prune_checkpoint(
                             self.source.path, prune, seed=self.seed, data_dir=self.data_dir,
                             models_dir=self.report_dir / 'trials', version=version,
                             overwrite=True, max_drop=None))
    rung = [pruned] if 0 in budget.bits else []
    for bits in sorted((bits for bits in budget.bits if bits), reverse=True):
      recipe = self.source.config.compress.quantize
      fine_tuned = budget.quantize_mode == 'qat'  # Distillation and shifts act in QAT only.
      quantize = dataclasses.replace(
          recipe, mode=budget.quantize_mode, bits=bits, finetune_epochs=budget.quantize_epochs,
          distill=recipe.distill if fine_tuned else 0.0,
          augment_shift=recipe.augment_shift if fine_tuned else 0,
          activations=(budget.activations or recipe.activations)
          if budget.quantize_mode in ('dynamic', 'qat') else 'per_row')
      rung.append(self._trial(sparsity, bits, {'prune': dataclasses.asdict(prune),
                                               'quantize': dataclasses.asdict(quantize)},
                              lambda version, quantize=quantize: compress_jobs.quantize_checkpoint(
                                  pruned.path, quantize, seed=self.seed, data_dir=self.data_dir,
                                  models_dir=self.report_dir / 'trials', version=version,
                                  overwrite=True, max_drop=None)))
    return rung

  def _write_records(self) -> None:
    self.report_dir.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(self.file, (json.dumps(self.records, indent=2) + '\n').encode())

  def _trial(self, sparsity: float, bits: int, recipe: dict[str, Any], run) -> Trial:
    recipe = {**recipe, 'seed': self.seed, 'source': str(self.source.path)}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    record = self.records.get(key)
    if record is not None and pathlib.Path(record['path']).is_dir():
      trial = Trial(**record)
      self.reused += 1
    else:
      result = run(f'1.{len(self.records) + 1}')
      accuracy = result.metadata['accuracy_guard']['accuracy']
      trial = Trial(sparsity=sparsity, bits=bits, path=str(result.path),
                    bytes=result.size.raw, validation_accuracy=accuracy,
                    drop_pp=100.0 * (_budget_source(result.metadata)['accuracy_guard'][
                        'accuracy_before'] - accuracy))
      self.records[key] = dataclasses.asdict(trial)
      distributed.on_primary('budget trial record', self._write_records)
      self.ran += 1
    self.trials.append(trial)
    if self.on_trial:
      self.on_trial(trial, record is not None)
    return trial


def _budget_source(metadata: dict[str, Any]) -> dict[str, Any]:
  """The metadata of the prune trial behind a trial: its 'before' figures are the source's."""
  if metadata['kind'] == 'pruned':
    return metadata
  return checkpoint_lib.read_metadata(metadata['source']['path'])


def _write_chosen(source, chosen: Trial, search: _Search, models_dir: pathlib.Path,
                  version: str | None, overwrite: bool) -> BudgetResult:
  """Copies the chosen trial to a new version beside the source's models; the result."""
  trial = checkpoint_lib.load_model(chosen.path)
  kind = trial.metadata['kind']
  version = version or checkpoint_lib.next_version(models_dir, kind)
  out_path = checkpoint_lib.checkpoint_path(models_dir, kind, version).absolute()
  durable.acquire(out_path)  # Released when the job returns or raises.
  durable.recover(out_path)
  checkpoint_lib.ensure_writable(out_path, overwrite)
  before = _budget_source(trial.metadata)
  metadata = {key: value for key, value in trial.metadata.items() if key != 'layout'}
  metadata.update(version=version, source={
      'path': str(source.path), 'kind': source.metadata.get('kind'),
      'version': source.metadata.get('version')}, budget={
          'max_drop_pp': search.settings.max_drop, 'trial': dataclasses.asdict(chosen),
          'trials': len(search.trials), 'report_dir': str(search.report_dir)})
  saved = checkpoint_lib.save_checkpoint(out_path, trial.variables, metadata,
                                         overwrite=overwrite)
  dense_path = checkpoint_lib.lineage_root(source.path, source.metadata)
  return BudgetResult(
      path=saved, chosen=chosen, trials=search.trials, source_path=source.path,
      source_validation_accuracy=before['accuracy_guard']['accuracy_before'],
      test_accuracy=metadata['metrics']['test']['accuracy'],
      source_test_accuracy=before['metrics']['test_before']['accuracy'],
      size=Footprint.of(saved), dense_float_size=Footprint.of(dense_path),
      report_dir=search.report_dir, ran=search.ran, reused=search.reused)
