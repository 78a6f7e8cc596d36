"""Multiply-adds per sample of an early-exit model's stages, and what a deep fraction costs.

Counted from the Dense layers' shapes (biases, ReLUs and the router's few
operations per sample are left out: under 1 % of any stage here), so the
mean cost of a run follows from the routes it took. `xla_check` compares
the count with XLA's cost analysis of each compiled route: half its FLOPs
are within `XLA_TOLERANCE` of the count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

# |XLA's FLOPs / 2 - counted multiply-adds| <= this fraction of the count, on
# either route: XLA also counts the biases, ReLUs, softmax and the routing
# comparison (0.1 to 0.3 % of the multiply-adds at MNIST's widths).
XLA_TOLERANCE = 0.005


@dataclasses.dataclass(frozen=True)
class RouteCost:
  """Multiply-adds per sample of an early-exit model's stages (Dense layers only).

  Biases, ReLUs and the router's few operations per sample are left out; they
  are under 1 % of any stage here.

  Attributes:
    stem: the trunk layers before the exit (every sample).
    exit_head: the exit head (every sample, unless routing is 'deep').
    expensive: the remaining trunk layers and the head (routed samples).
  """
  stem: int
  exit_head: int
  expensive: int

  @property
  def cheap(self) -> int:
    """What a sample on the cheap route costs: the stem and the exit head."""
    return self.stem + self.exit_head

  @property
  def always_deep(self) -> int:
    """What the same model run with routing 'deep' costs: the stem and the rest."""
    return self.stem + self.expensive

  def mean(self, deep_fraction: float) -> float:
    """Mean cost per sample when `deep_fraction` of samples run the expensive stage."""
    return self.cheap + deep_fraction * self.expensive

  def deep_fraction_for(self, compute_fraction: float) -> float:
    """The deep fraction whose mean cost is `compute_fraction` of always-deep."""
    return (compute_fraction * self.always_deep - self.cheap) / self.expensive


def route_cost(model, num_features: int) -> RouteCost:
  """The `RouteCost` of an `EarlyExitMLP` on inputs of width `num_features`."""
  widths = (num_features, *model.hidden_sizes)
  layers = [a * b for a, b in zip(widths[:-1], widths[1:], strict=True)]
  exit_input = widths[model.exit_after]
  exit_head = (exit_input * model.exit_width + model.exit_width * model.num_classes
               if model.exit_width else exit_input * model.num_classes)
  return RouteCost(
      stem=sum(layers[:model.exit_after]),
      exit_head=exit_head,
      expensive=sum(layers[model.exit_after:]) + widths[-1] * model.num_classes)


def xla_check(model, variables: Any, num_features: int) -> dict[str, dict[str, float]]:
  """Counted multiply-adds per sample of each route against XLA's cost analysis.

  Each route is the model compiled with routing 'deep' (the always-deep
  model) or 'shallow' (the cheap stage alone) at batch 1.

  Returns:
    {'deep': ..., 'shallow': ...}, each {'counted': multiply-adds,
    'xla_flops': XLA's FLOPs, 'xla_multiply_adds': half of them,
    'relative_difference': (xla_multiply_adds - counted) / counted}.
  """
  cost = route_cost(model, num_features)
  sample = jax.ShapeDtypeStruct((1, num_features), np.float32)
  checks = {}
  for routing, counted in (('deep', cost.always_deep), ('shallow', cost.cheap)):
    analysis = jax.jit(model.clone(routing=routing).apply).lower(
        variables, sample).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    flops = float(analysis['flops'])
    checks[routing] = {'counted': float(counted), 'xla_flops': flops,
                       'xla_multiply_adds': flops / 2,
                       'relative_difference': (flops / 2 - counted) / counted}
  return checks
