"""One configuration object: a frozen dataclass tree loaded from YAML.

Every key is checked on load; an unknown key, a value of the wrong type or an
impossible value raises `ConfigError` naming the key, the value and what was
expected, before any work starts.

Example:
  >>> config = load_config('configs/digits.yaml', overrides=['training.epochs=2'])
  >>> config.training.epochs
  2
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import types
import typing
from typing import Any, Mapping, Sequence

import yaml

from dnnr_jax.errors import ConfigError

DATASETS = ('mnist', 'digits')
# The largest raw pixel value of each data set: MNIST bytes, digits' 0..16 counts.
PIXEL_MAX = {'mnist': 255.0, 'digits': 16.0}
ROUTING_MODES = ('per_sample', 'batch', 'deep', 'shallow')
MODEL_FAMILIES = ('original', 'early_exit')
ROUTERS = ('complexity', 'confidence')
CALIBRATION_TARGETS = ('compute', 'deep_fraction')
LR_SCHEDULES = ('constant', 'cosine')
PRUNE_METHODS = ('global', 'layer', 'lamp', 'structured', 'nm')
PRUNE_SCHEDULES = ('oneshot', 'gradual')
QUANTIZE_MODES = ('weight_only', 'dynamic', 'static', 'qat')
CALIBRATION_METHODS = ('minmax', 'percentile')
QUANTIZE_ACTIVATIONS = ('per_row', 'per_batch')
# Weight code widths. 7 is onnxruntime's `reduce_range`: |code| <= 63, so uint8 x int8
# products never saturate the int16 pair sums of AVX2-only CPUs and every integer export
# runs on the u8s8 kernels (VNNI, AMX) that 8-bit codes must avoid to stay exact.
QUANTIZE_BITS = (8, 7, 4)
QUANTIZE_SOURCES = ('final', 'pruned')
BUDGET_METHODS = ('global', 'lamp')
# Bounds that keep a typo from overflowing int64 or float32 deep inside JAX.
MAX_EPOCHS = 1_000_000
MAX_SEED = 2**63 - 1
MAX_AUGMENT_SHIFT = 7  # pixels: a quarter of an MNIST image's side
MAX_NORMALISED = 1e6  # largest |normalised pixel| data.mean and data.std may produce
YAML_MAX_NODES = 100_000  # values a config may expand to, aliases included


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which data set, and how its pixels are normalised.

  Attributes:
    dataset: 'mnist' (the four IDX files) or 'digits' (scikit-learn's bundled
      8x8 digits, offline).
    mean: subtracted from pixels scaled to [0, 1].
    std: divides the centred pixels.
    validation_size: examples held out of the training split for validation.
  """
  dataset: str = 'mnist'
  mean: float = 0.1307
  std: float = 0.3081
  validation_size: int = 0

  def validate(self) -> None:
    _check_choice('data.dataset', self.dataset, DATASETS)
    _check_finite('data.mean', self.mean)
    _check_positive('data.std', self.std)
    largest = (abs(self.mean) + 1) / self.std
    if largest > MAX_NORMALISED:
      raise ConfigError(
          f'data.std = {self.std!r} with data.mean = {self.mean!r} would normalise pixels to '
          f'{largest:.3g}, beyond {MAX_NORMALISED:g}; use the data\'s own mean and standard '
          'deviation of pixels scaled to [0, 1], e.g. 0.1307 and 0.3081.')
    _check_at_least('data.validation_size', self.validation_size, 0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Layer widths; the input width comes from the data.

  Attributes:
    family: 'original' (the paper's trunk, deep block or shortcut, head: both
      routes cost the same, so routing saves no compute) or 'early_exit' (a
      cheap exit; a sample routed to it skips the later, expensive layers).
    hidden_sizes: widths of the trunk's Dense+ReLU layers.
    deep_size: width of the deep block and of the shortcut ('original' only).
    num_classes: width of the head.
    exit_after: 'early_exit': the cheap exit leaves after this many trunk
      layers (0: straight from the input).
    exit_width: 'early_exit': hidden width of the exit head (Dense+ReLU
      before its classifier); 0 makes the exit one linear layer.
    exit_loss_weight: 'early_exit': weight of the exit's cross-entropy in the
      training loss (the final head's has weight 1); both exits train jointly.
  """
  family: str = 'original'
  hidden_sizes: tuple[int, ...] = (256, 256)
  deep_size: int = 128
  num_classes: int = 10
  exit_after: int = 0
  exit_width: int = 0
  exit_loss_weight: float = 1.0

  def validate(self) -> None:
    _check_choice('model.family', self.family, MODEL_FAMILIES)
    if not self.hidden_sizes:
      raise ConfigError(
          'model.hidden_sizes is empty; give at least one layer width, '
          'e.g. [256, 256].')
    for index, size in enumerate(self.hidden_sizes):
      _check_at_least(f'model.hidden_sizes[{index}]', size, 1)
    _check_at_least('model.deep_size', self.deep_size, 1)
    _check_at_least('model.num_classes', self.num_classes, 2)
    _check_at_least('model.exit_after', self.exit_after, 0)
    if self.exit_after >= len(self.hidden_sizes):
      raise ConfigError(
          f'model.exit_after = {self.exit_after} leaves no trunk layer for the deep '
          f'route ({len(self.hidden_sizes)} hidden_sizes); choose at most '
          f'{len(self.hidden_sizes) - 1}.')
    _check_at_least('model.exit_width', self.exit_width, 0)
    if not (math.isfinite(self.exit_loss_weight) and self.exit_loss_weight >= 0):
      raise ConfigError(
          f'model.exit_loss_weight = {self.exit_loss_weight!r} must be a finite number >= 0.')


@dataclasses.dataclass(frozen=True)
class ThresholdValues:
  """One value per complexity metric."""
  variance: float = 0.5
  entropy: float = 0.5
  sparsity: float = 0.5

  def validate(self, prefix: str) -> None:
    for field in dataclasses.fields(self):
      _check_finite(f'{prefix}.{field.name}', getattr(self, field.name))


@dataclasses.dataclass(frozen=True)
class ThresholdsConfig:
  """The hybrid thresholds' linear annealing schedule.

  Before `annealing_start_epoch` the thresholds are `initial`; from there they
  move linearly to `final`, reached at `total_epochs`. `final` = 0 everywhere
  reproduces the original (where the sparsity test then never holds).

  Attributes:
    initial: thresholds before annealing.
    final: thresholds at the end of annealing.
    annealing_start_epoch: first epoch of annealing.
    total_epochs: epoch at which `final` is reached; None means
      `training.epochs`.
    confidence: the confidence router's threshold (model.family
      'early_exit'): a sample goes deep iff the exit's largest softmax
      probability is below it (above 1: every sample). Held fixed while
      training; `dnnr calibrate` chooses it for a compute budget.
  """
  initial: ThresholdValues = ThresholdValues()
  final: ThresholdValues = ThresholdValues(0.0, 0.0, 0.0)
  annealing_start_epoch: int = 5
  total_epochs: int | None = None
  confidence: float = 0.9

  def validate(self) -> None:
    if not (math.isfinite(self.confidence) and self.confidence >= 0):
      raise ConfigError(
          f'thresholds.confidence = {self.confidence!r} must be a finite number >= 0 '
          '(above 1 every sample goes deep).')
    self.initial.validate('thresholds.initial')
    self.final.validate('thresholds.final')
    _check_at_least(
        'thresholds.annealing_start_epoch', self.annealing_start_epoch, 0)
    if self.total_epochs is not None:
      _check_at_least('thresholds.total_epochs', self.total_epochs, 1)


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
  """How each input picks the deep block or the shortcut.

  Attributes:
    mode: 'per_sample' (each example by its own metrics), 'batch' (the
      original: one decision per batch from batch means), 'deep' or
      'shallow' (always one path).
    router: what decides, for model.family 'early_exit': 'complexity' (the
      original hybrid thresholds on the input's variance, entropy and
      sparsity, known before any layer) or 'confidence' (the cheap exit's
      largest softmax probability, as BranchyNet). The 'original' family
      routes by complexity only.
  """
  mode: str = 'per_sample'
  router: str = 'complexity'

  def validate(self) -> None:
    _check_choice('routing.mode', self.mode, ROUTING_MODES)
    _check_choice('routing.router', self.router, ROUTERS)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The devices training, fine-tuning and evaluation run on (`dnnr_jax.parallel`).

  Attributes:
    devices: devices of the one-axis 'data' mesh, across all processes; 0
      takes every device. The batch size must divide evenly over them.
    shard_params: split kernels and their optimizer state over the devices
      along their first axis (FSDP-style) instead of replicating them.
  """
  devices: int = 0
  shard_params: bool = False

  def validate(self) -> None:
    _check_at_least('training.mesh.devices', self.devices, 0)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
  """Optimisation and bookkeeping.

  Attributes:
    epochs: passes over the training split.
    batch_size: examples per Adam step.
    learning_rate: Adam's (peak) learning rate.
    lr_schedule: 'constant' or 'cosine' (decay to 0 over all steps).
    seed: seeds initialisation and shuffling; equal seeds, equal runs.
    eval_batch_size: examples per evaluation batch (also the batch whose
      means route in 'batch' mode).
    checkpoint_every: epochs between periodic checkpoints; 0 disables them.
    keep_checkpoints: periodic checkpoints kept on disk.
    scan_unroll: optimizer steps per iteration of the epoch's loop; 4 is
      about 10 % faster on an H100, 1 is best on CPU.
    mesh: the devices to run on.
    augment_shift: while training from scratch, move each training image by
      a random offset of up to this many pixels per axis (`augment.Shift`);
      0: the images as they are. Fine-tuning has its own settings
      (`compress.prune.augment_shift`, `compress.quantize.augment_shift`).
  """
  epochs: int = 10
  batch_size: int = 64
  learning_rate: float = 1e-3
  lr_schedule: str = 'constant'
  seed: int = 0
  eval_batch_size: int = 1000
  checkpoint_every: int = 1
  keep_checkpoints: int = 2
  scan_unroll: int = 1
  mesh: MeshConfig = MeshConfig()
  augment_shift: int = 0

  def validate(self) -> None:
    _check_at_least('training.epochs', self.epochs, 1)
    _check_at_most('training.epochs', self.epochs, MAX_EPOCHS)
    _check_at_least('training.batch_size', self.batch_size, 1)
    _check_positive('training.learning_rate', self.learning_rate)
    _check_choice('training.lr_schedule', self.lr_schedule, LR_SCHEDULES)
    _check_at_least('training.seed', self.seed, 0)
    _check_at_most('training.seed', self.seed, MAX_SEED)
    _check_at_least('training.eval_batch_size', self.eval_batch_size, 1)
    _check_at_least('training.checkpoint_every', self.checkpoint_every, 0)
    _check_at_least('training.keep_checkpoints', self.keep_checkpoints, 1)
    _check_at_least('training.scan_unroll', self.scan_unroll, 1)
    _check_at_least('training.augment_shift', self.augment_shift, 0)
    self.mesh.validate()


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """How to prune: the pipeline's pruning stage, and `dnnr prune`'s flags and defaults.

  Attributes:
    method: 'global' or 'layer' magnitude, 'lamp' (LAMP scores, one global
      cut: a sparsity per layer), 'structured' (whole units) or 'nm'.
    sparsity: fraction of kernel weights (units for 'structured') removed.
    schedule: 'oneshot' (prune, then fine-tune with the mask fixed) or
      'gradual' (Zhu & Gupta's cubic schedule during fine-tuning).
    finetune_epochs: Adam epochs after or during pruning.
    learning_rate: fine-tuning's peak learning rate; None keeps training's.
    distill: share of the fine-tuning loss that distils the unpruned model's
      outputs (0: labels only).
    distill_temperature: the temperature that softens them.
    augment_shift: while fine-tuning, shift every training image by a random
      offset of up to this many pixels along each axis (background-filled),
      the same shift for the student and the teacher (`augment.Shift`); 0:
      no augmentation.
    n, m: the N:M pattern for 'nm' (n of every m inputs kept, 1 <= n < m).
    gradual_end: for 'gradual', the latest fraction of the fine-tuning steps
      after which the schedule holds the final sparsity. The schedule ends
      by min(gradual_end * T, T - R) of T steps, where the recovery phase R
      is at least one epoch and a quarter of T (`gradual.pruning_end_step`).
    mask_updates: for 'gradual', about how many times the masks are
      recomputed over fine-tuning (every steps // mask_updates steps).
  """
  method: str = 'global'
  sparsity: float = 0.9
  schedule: str = 'gradual'
  finetune_epochs: int = 10
  learning_rate: float | None = None
  distill: float = 0.0
  distill_temperature: float = 4.0
  augment_shift: int = 0
  n: int = 2
  m: int = 4
  gradual_end: float = 0.75
  mask_updates: int = 100

  def validate(self) -> None:
    key = 'compress.prune'
    _check_choice(f'{key}.method', self.method, PRUNE_METHODS)
    _check_fraction(f'{key}.sparsity', self.sparsity)
    _check_choice(f'{key}.schedule', self.schedule, PRUNE_SCHEDULES)
    _check_at_least(f'{key}.finetune_epochs', self.finetune_epochs, 0)
    if self.learning_rate is not None:
      _check_positive(f'{key}.learning_rate', self.learning_rate)
    _check_distill(f'{key}.distill', self.distill)
    if self.distill and self.finetune_epochs < 1:
      raise ConfigError(f'{key}.distill acts while fine-tuning: it needs '
                        f'{key}.finetune_epochs of at least 1.')
    _check_positive(f'{key}.distill_temperature', self.distill_temperature)
    _check_augment_shift(f'{key}.augment_shift', self.augment_shift, self.finetune_epochs,
                         f'{key}.finetune_epochs')
    if self.schedule == 'gradual' and (
        self.method not in ('global', 'layer', 'lamp') or self.finetune_epochs < 1):
      raise ConfigError(
          f'{key}.schedule = gradual prunes during fine-tuning: it needs {key}.method '
          f'global, layer or lamp and {key}.finetune_epochs of at least 1; otherwise set '
          f'{key}.schedule to oneshot.')
    _check_at_least(f'{key}.n', self.n, 1)
    if self.m <= self.n:
      raise ConfigError(f'{key}.m = {self.m} must be larger than {key}.n = {self.n}.')
    if not (math.isfinite(self.gradual_end) and 0 < self.gradual_end <= 1):
      raise ConfigError(f'{key}.gradual_end = {self.gradual_end!r} must be in (0, 1].')
    _check_at_least(f'{key}.mask_updates', self.mask_updates, 1)


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
  """How to quantize: the pipeline's quantization stage, and `dnnr quantize`'s flags and defaults.

  Attributes:
    source: the pipeline quantizes the 'pruned' model (pruned + int8) or the
      'final' one.
    mode: 'weight_only', 'dynamic', 'static' or 'qat'.
    bits: 8, 7 or 4 (7: onnxruntime's `reduce_range`, the fastest exact int8 export on
      every x86 CPU; see docs/onnx.md).
    per_channel: one scale per output channel, else per tensor.
    activations: how 'dynamic' and 'qat' quantize activations at run time:
      'per_row' (one scale per example, so a prediction does not depend on
      its batch) or 'per_batch' (one uint8 scale and zero point per batch,
      ONNX's `DynamicQuantizeLinear`: the form onnxruntime fuses into its
      fastest int8 kernel, but a prediction depends on the rest of its batch).
    calibration_batches: training batches that calibrate 'static'.
    calibration_method: 'minmax' or 'percentile'.
    finetune_epochs: QAT epochs.
    learning_rate: QAT's peak learning rate; None keeps training's.
    distill: 'qat': share of the loss that distils the dense float model at
      the root of the source's lineage (0: labels only).
    distill_temperature: the temperature that softens its outputs.
    augment_shift: 'qat': shift every training image by a random offset of
      up to this many pixels (the same for the teacher); 0: off.
  """
  source: str = 'pruned'
  mode: str = 'dynamic'
  bits: int = 8
  per_channel: bool = True
  activations: str = 'per_row'
  calibration_batches: int = 10
  calibration_method: str = 'minmax'
  finetune_epochs: int = 2
  learning_rate: float | None = None
  distill: float = 0.0
  distill_temperature: float = 4.0
  augment_shift: int = 0

  def validate(self) -> None:
    _check_choice('compress.quantize.source', self.source, QUANTIZE_SOURCES)
    _check_choice('compress.quantize.mode', self.mode, QUANTIZE_MODES)
    if self.bits not in QUANTIZE_BITS:
      raise ConfigError(f'compress.quantize.bits = {self.bits!r} must be 8, 7 or 4.')
    _check_choice('compress.quantize.activations', self.activations, QUANTIZE_ACTIVATIONS)
    if self.activations == 'per_batch' and self.mode not in ('dynamic', 'qat'):
      raise ConfigError(
          f"compress.quantize.activations = per_batch applies to mode dynamic or qat only; "
          f"set it to per_row for compress.quantize.mode = {self.mode}.")
    _check_at_least('compress.quantize.calibration_batches', self.calibration_batches, 1)
    _check_choice('compress.quantize.calibration_method', self.calibration_method,
                  CALIBRATION_METHODS)
    _check_at_least('compress.quantize.finetune_epochs', self.finetune_epochs, 0)
    if self.mode == 'qat' and self.finetune_epochs < 1:
      raise ConfigError(
          f'compress.quantize.finetune_epochs = {self.finetune_epochs} must be at least 1 '
          'for compress.quantize.mode = qat, which fine-tunes with fake quantization.')
    if self.learning_rate is not None:
      _check_positive('compress.quantize.learning_rate', self.learning_rate)
    _check_distill('compress.quantize.distill', self.distill)
    _check_positive('compress.quantize.distill_temperature', self.distill_temperature)
    _check_augment_shift('compress.quantize.augment_shift', self.augment_shift,
                         self.finetune_epochs, 'compress.quantize.finetune_epochs')
    if (self.distill or self.augment_shift) and self.mode != 'qat':
      raise ConfigError(
          'compress.quantize.distill and augment_shift act while fine-tuning, in '
          f'compress.quantize.mode = qat only; set them to 0 for mode {self.mode}.')


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
  """`dnnr compress`: the smallest model within an accuracy budget, searched on validation.

  Each rung of the ladder prunes the source gradually to one sparsity (for
  `finetune_epochs`, with the source's `compress.prune` distillation and
  learning rate) and quantizes the result to each of `bits`; of the trials
  whose validation accuracy is within `max_drop` of the source's, the one
  with the fewest bytes on disk is kept.

  Attributes:
    max_drop: the budget: the largest validation accuracy drop allowed, in
      percentage points (0.1 = 0.1 pp).
    method: the pruning scores, 'global' magnitude (the default: it kept
      more validation accuracy than 'lamp' at equal sparsity on MNIST, see
      docs/compression.md) or 'lamp'.
    sparsities: the sparsity ladder tried, in increasing order; the search
      stops climbing once a sparsity misses the budget at every bit width.
    bits: quantization bit widths tried after pruning (8, 7 and/or 4; 0 adds
      the pruned float model itself).
    finetune_epochs: fine-tuning epochs of each pruning trial.
    quantize_mode: 'weight_only', 'dynamic' or 'qat' for the quantization.
    quantize_epochs: QAT epochs (quantize_mode 'qat').
    activations: 'per_row' or 'per_batch' activations of the quantized trials
      (modes 'dynamic' and 'qat'; see `QuantizeConfig`); None takes the
      source's `compress.quantize.activations`.
    in_pipeline: `dnnr pipeline` also runs the search on its final model
      (stage 'budget', after the sweep) and reports the choice.
  """
  max_drop: float = 0.1
  method: str = 'global'
  sparsities: tuple[float, ...] = (0.8, 0.9, 0.94, 0.96, 0.97, 0.98)
  bits: tuple[int, ...] = (8, 4)
  finetune_epochs: int = 10
  quantize_mode: str = 'qat'
  quantize_epochs: int = 2
  activations: str | None = None
  in_pipeline: bool = False

  def validate(self) -> None:
    key = 'compress.budget'
    check_max_drop(self.max_drop, f'{key}.max_drop')
    _check_choice(f'{key}.method', self.method, BUDGET_METHODS)
    if not self.sparsities:
      raise ConfigError(f'{key}.sparsities is empty; give at least one, e.g. [0.9, 0.95].')
    for index, sparsity in enumerate(self.sparsities):
      _check_fraction(f'{key}.sparsities[{index}]', sparsity)
    if list(self.sparsities) != sorted(set(self.sparsities)):
      raise ConfigError(f'{key}.sparsities = {list(self.sparsities)} must increase strictly, '
                        'e.g. [0.8, 0.9, 0.95].')
    if not self.bits or any(bits not in (0, *QUANTIZE_BITS) for bits in self.bits):
      raise ConfigError(f'{key}.bits = {list(self.bits)} must be a non-empty list of 8, 7, 4 '
                        'or 0 (float).')
    _check_at_least(f'{key}.finetune_epochs', self.finetune_epochs, 1)
    _check_choice(f'{key}.quantize_mode', self.quantize_mode, ('weight_only', 'dynamic', 'qat'))
    _check_at_least(f'{key}.quantize_epochs', self.quantize_epochs,
                    1 if self.quantize_mode == 'qat' else 0)
    if self.activations is not None:
      _check_choice(f'{key}.activations', self.activations, QUANTIZE_ACTIVATIONS)
      if self.activations == 'per_batch' and self.quantize_mode == 'weight_only':
        raise ConfigError(f'{key}.activations = per_batch applies to quantize_mode dynamic or '
                          'qat only; set it to per_row or null for quantize_mode weight_only.')


@dataclasses.dataclass(frozen=True)
class CompressConfig:
  """What `dnnr pipeline` does after training.

  Attributes:
    prune, quantize: the pipeline's pruning and quantization stages.
    max_drop: the accuracy guard: a prune or quantize whose validation
      accuracy falls more than this many percentage points below its
      source's warns and records `over_budget` in its metadata.
    budget: `dnnr compress`'s search for the smallest model within a budget.
  """
  prune: PruneConfig = PruneConfig()
  quantize: QuantizeConfig = QuantizeConfig()
  max_drop: float = 1.0
  budget: BudgetConfig = BudgetConfig()

  def validate(self) -> None:
    self.prune.validate()
    self.quantize.validate()
    check_max_drop(self.max_drop, 'compress.max_drop')
    self.budget.validate()


def check_calibration(budget: float, router: str, target: str) -> None:
  """`dnnr calibrate`'s request: a budget in (0, 1], a known router and target."""
  if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (
      math.isfinite(budget) and 0 < budget <= 1):
    raise ConfigError(f'budget {budget!r} is not in (0, 1]; pass a fraction such as 0.25.')
  if router not in ROUTERS:
    raise ConfigError(f"router {router!r} is not one of: {', '.join(ROUTERS)}.")
  if target not in CALIBRATION_TARGETS:
    raise ConfigError(f"target {target!r} is not one of: {', '.join(CALIBRATION_TARGETS)}.")


def check_max_drop(value: float, key: str = 'compress.max_drop') -> None:
  """Rejects an accuracy budget that is not a finite number of percentage points >= 0."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      math.isfinite(value) and value >= 0):
    raise ConfigError(f'{key} = {value!r} must be a number of percentage points >= 0, '
                      'e.g. 0.5.')


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """The pipeline's sweep and measurements.

  Attributes:
    sweep_sparsities: one pruned, fine-tuned model per sparsity for the
      accuracy-against-sparsity plot (with the prune stage's method and
      schedule); empty for no sweep.
    sweep_finetune_epochs: fine-tuning epochs of each sweep model.
    benchmark_seconds: about how long each latency or throughput is timed.
  """
  sweep_sparsities: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
  sweep_finetune_epochs: int = 2
  benchmark_seconds: float = 1.0

  def validate(self) -> None:
    for index, sparsity in enumerate(self.sweep_sparsities):
      _check_fraction(f'pipeline.sweep_sparsities[{index}]', sparsity)
    _check_at_least('pipeline.sweep_finetune_epochs', self.sweep_finetune_epochs, 0)
    _check_positive('pipeline.benchmark_seconds', self.benchmark_seconds)


@dataclasses.dataclass(frozen=True)
class Config:
  """The whole configuration of a dnnr_jax run."""
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  thresholds: ThresholdsConfig = ThresholdsConfig()
  routing: RoutingConfig = RoutingConfig()
  training: TrainingConfig = TrainingConfig()
  compress: CompressConfig = CompressConfig()
  pipeline: PipelineConfig = PipelineConfig()

  @property
  def annealing_total_epochs(self) -> int:
    """The epoch at which the thresholds reach their final values."""
    if self.thresholds.total_epochs is None:
      return self.training.epochs
    return self.thresholds.total_epochs

  def validate(self) -> Config:
    """Checks every value; returns self so calls chain."""
    for field in dataclasses.fields(self):
      getattr(self, field.name).validate()
    if self.routing.router == 'confidence' and self.model.family != 'early_exit':
      raise ConfigError(
          "routing.router = 'confidence' needs the cheap exit of model.family = "
          "'early_exit'; set the family or use router 'complexity'.")
    if self.thresholds.annealing_start_epoch > self.annealing_total_epochs:
      raise ConfigError(
          'thresholds.annealing_start_epoch = '
          f'{self.thresholds.annealing_start_epoch} is after the last '
          f'annealing epoch ({self.annealing_total_epochs}, from '
          'thresholds.total_epochs or training.epochs); lower it or raise '
          'the total.')
    return self

  def to_dict(self) -> dict[str, Any]:
    """A plain, JSON- and YAML-ready dictionary (tuples become lists)."""
    return _plain(dataclasses.asdict(self))

  def replace(self, **sections: Any) -> Config:
    return dataclasses.replace(self, **sections)


def config_from_dict(values: Mapping[str, Any], source: str = 'config') -> Config:
  """Builds and validates a `Config` from nested mappings.

  Args:
    values: nested mappings of section -> key -> value; missing keys keep
      their defaults.
    source: names the origin of `values` in error messages.

  Returns:
    The validated configuration.

  Raises:
    ConfigError: a key is unknown or a value has the wrong type or is
      impossible.
  """
  try:
    return _build(Config, values, prefix='').validate()
  except ConfigError as error:
    raise ConfigError(f'{source}: {error}') from None


def load_config(
    path: str | pathlib.Path | None = None,
    overrides: Sequence[str] = (),
) -> Config:
  """Loads a YAML file (or the defaults) and applies `key=value` overrides.

  Args:
    path: a YAML file; None starts from the defaults.
    overrides: dotted assignments such as 'training.epochs=1'; the value is
      parsed as YAML.

  Returns:
    The validated configuration.

  Raises:
    ConfigError: the file is missing or not YAML, or a key or value is bad.
  """
  values: dict[str, Any] = {}
  source = 'defaults'
  if path is not None:
    source = str(path)
    path = pathlib.Path(path)
    if not path.is_file():
      raise ConfigError(
          f'config file {source} does not exist; pass an existing YAML file, '
          'e.g. configs/default.yaml.')
    try:
      loaded = _load_yaml(path.read_text(), f'config file {source}')
    except yaml.YAMLError as error:
      raise ConfigError(
          f'config file {source} is not valid YAML ({error}); fix the '
          'syntax.') from None
    if loaded is not None and not isinstance(loaded, dict):
      raise ConfigError(
          f'config file {source} must hold a mapping of sections, not '
          f'{type(loaded).__name__}.')
    values = loaded or {}
  for assignment in overrides:
    _apply_override(values, assignment)
  return config_from_dict(values, source)


def _apply_override(values: dict[str, Any], assignment: str) -> None:
  key, separator, text = assignment.partition('=')
  if not separator or not key.strip():
    raise ConfigError(
        f'override {assignment!r} is not of the form key=value, e.g. '
        'training.epochs=1.')
  try:
    value = _load_yaml(text, f'override {assignment!r}')
  except yaml.YAMLError:
    value = text
  *parents, leaf = key.strip().split('.')
  node = values
  for part in parents:
    child = node.setdefault(part, {})
    if not isinstance(child, dict):
      raise ConfigError(
          f'override {assignment!r}: {part} is a value, not a section.')
    node = child
  node[leaf] = value


class _Loader(yaml.SafeLoader):
  """PyYAML's safe loader, reading floats as YAML 1.2 does: `1e-3` is a number."""


_Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'''^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$''', re.X),
    list('-+0123456789.'))


def _load_yaml(text: str, source: str) -> Any:
  """Safe YAML with YAML 1.2 floats; refuses documents that expand past `YAML_MAX_NODES`.

  Aliases are shared, not copied, when loaded; counting what they expand to
  stops an alias bomb before anything walks it.
  """
  value = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
  budget = [YAML_MAX_NODES]

  def count(node: Any) -> None:
    budget[0] -= 1
    if budget[0] < 0:
      raise ConfigError(
          f'{source} expands to more than {YAML_MAX_NODES:,} values (YAML aliases); write '
          'the values out.')
    if isinstance(node, dict):
      for key, item in node.items():
        count(key)
        count(item)
    elif isinstance(node, list):
      for item in node:
        count(item)

  count(value)
  return value


def _build(cls: type, values: Any, prefix: str) -> Any:
  """Turns a mapping into dataclass `cls`, checking keys and types."""
  where = prefix.rstrip('.') or 'the top level'
  if not isinstance(values, Mapping):
    raise ConfigError(
        f'{where} must be a mapping of keys, got {values!r}.')
  fields = {field.name: field for field in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  unknown = [key for key in values if key not in fields]
  if unknown:
    raise ConfigError(
        f"unknown key '{prefix}{unknown[0]}'; expected one of: "
        f"{', '.join(fields)}.")
  kwargs = {
      key: _coerce(hints[key], value, f'{prefix}{key}')
      for key, value in values.items()
  }
  return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
  """Checks `value` against the annotation `hint` and converts it."""
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(hint)
    if value is None and type(None) in options:
      return None
    (hint,) = [option for option in options if option is not type(None)]
    origin = typing.get_origin(hint)
  if dataclasses.is_dataclass(hint):
    return _build(hint, values=value, prefix=f'{key}.')
  if origin is tuple:
    (item_hint, _) = typing.get_args(hint)
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f'{key} = {value!r} is not a list; expected e.g. [256, 256].')
    return tuple(
        _coerce(item_hint, item, f'{key}[{index}]')
        for index, item in enumerate(value))
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f'{key} = {value!r} is not a number.')
    return float(value)
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f'{key} = {value!r} is not an integer.')
    return value
  if hint is bool:
    if not isinstance(value, bool):
      raise ConfigError(f'{key} = {value!r} is not true or false.')
    return value
  if hint is str:
    if not isinstance(value, str):
      raise ConfigError(f'{key} = {value!r} is not a string.')
    return value
  raise TypeError(f'no coercion for {key}: {hint}')


def _plain(value: Any) -> Any:
  if isinstance(value, dict):
    return {key: _plain(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(item) for item in value]
  return value


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ConfigError(
        f"{key} = {value!r} is not one of: {', '.join(choices)}.")


def _check_finite(key: str, value: float) -> None:
  if not math.isfinite(value):
    raise ConfigError(f'{key} = {value!r} must be a finite number.')


def _check_fraction(key: str, value: float) -> None:
  if not (math.isfinite(value) and 0 <= value < 1):
    raise ConfigError(f'{key} = {value!r} must be in [0, 1).')


def _check_positive(key: str, value: float) -> None:
  if not (math.isfinite(value) and value > 0):
    raise ConfigError(f'{key} = {value!r} must be a positive number.')


def _check_distill(key: str, value: float) -> None:
  if not (math.isfinite(value) and 0 <= value <= 1):
    raise ConfigError(f'{key} = {value!r} must be in [0, 1], a share of the loss, e.g. 0.5.')


def _check_augment_shift(key: str, value: int, epochs: int, epochs_key: str) -> None:
  if not 0 <= value <= MAX_AUGMENT_SHIFT:
    raise ConfigError(f'{key} = {value!r} must be a number of pixels from 0 (off) to '
                      f'{MAX_AUGMENT_SHIFT}, e.g. 2.')
  if value and epochs < 1:
    raise ConfigError(f'{key} shifts images while fine-tuning: it needs {epochs_key} of at '
                      'least 1, or set it to 0.')


def _check_at_most(key: str, value: int, maximum: int) -> None:
  if value > maximum:
    raise ConfigError(f'{key} = {value!r} must be at most {maximum}.')


def _check_at_least(key: str, value: int, minimum: int) -> None:
  if value < minimum:
    raise ConfigError(f'{key} = {value!r} must be at least {minimum}.')
