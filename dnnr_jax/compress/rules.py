"""Quantization rules: which layers, chosen by regular expressions on module paths, and how.

A rule is one frozen object, as qwix's `QuantizationRule`: a `pattern` fully
matched against a layer's module path ('Conv_0', 'encoder/Dense_1', for NNX
'layers/0'), and how to quantize what it matches. The first rule whose
pattern matches a layer decides for it; unmatched layers run untouched.

Modes:
  weight_only: int kernels, dequantized and multiplied in float.
  dynamic: int8 kernels times int8 activations quantized per row at run time,
    accumulated in int32 (`preferred_element_type=jnp.int32`); with
    `activations='per_batch'`, uint8 activations with one scale and zero point
    per batch (ONNX's `DynamicQuantizeLinear`, as onnxruntime's
    `quantize_dynamic` does it), so a prediction depends on its batch.
  static: like dynamic, with one activation scale per layer from calibration.
  qat: float kernels fake-quantized in the forward pass, identity gradient
    (straight-through), for training; `dynamic` rules then deploy the result.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from dnnr_jax.compress import qat, quantize
from dnnr_jax.config import QUANTIZE_ACTIVATIONS as ACTIVATIONS
from dnnr_jax.errors import QuantizationError

MODES = ('weight_only', 'dynamic', 'static', 'qat')


@dataclasses.dataclass(frozen=True)
class Rule:
  """How the layers whose module path fully matches `pattern` are quantized.

  Attributes:
    pattern: a regular expression, e.g. '.*' (every layer) or 'Conv_.*'.
    mode: one of MODES.
    bits: 8, 7 or 4 (narrower codes multiply on the int8 kernels too).
    per_channel: one scale per output channel, else one per kernel.
    activations: how 'dynamic' (and 'qat', deployed as 'dynamic') quantizes a
      Dense layer's inputs: 'per_row', one scale per example, or
      'per_batch', one per batch (`quantize.quantize_batch`).
  """
  pattern: str = '.*'
  mode: str = 'dynamic'
  bits: int = 8
  per_channel: bool = True
  activations: str = 'per_row'

  @property
  def axis(self) -> int | None:
    return -1 if self.per_channel else None


def check_rules(rules: Sequence[Rule]) -> tuple[Rule, ...]:
  """The rules as a tuple, each checked; QuantizationError names the bad one."""
  if isinstance(rules, Rule) or not rules:
    raise QuantizationError(f'rules = {rules!r} is not a non-empty sequence of Rule; '
                            "pass e.g. [Rule('.*', mode='dynamic')].")
  for rule in rules:
    if not isinstance(rule, Rule):
      raise QuantizationError(f'rule {rule!r} is not a compress.Rule; build it with Rule(...).')
    if rule.mode not in MODES:
      raise QuantizationError(f'rule {rule.pattern!r} has mode {rule.mode!r}; pass one of '
                              f'{", ".join(MODES)}.')
    try:
      re.compile(rule.pattern)
    except re.error as error:
      raise QuantizationError(f'rule pattern {rule.pattern!r} is not a regular expression '
                              f'({error}); fix it.') from None
    quantize.code_range(rule.bits, True)
    if rule.activations not in ACTIVATIONS:
      raise QuantizationError(f'rule {rule.pattern!r} has activations {rule.activations!r}; '
                              f'pass one of {", ".join(ACTIVATIONS)}.')
    if rule.activations == 'per_batch' and rule.mode not in ('dynamic', 'qat'):
      raise QuantizationError(f"rule {rule.pattern!r} has activations 'per_batch', which only "
                              f"modes dynamic and qat use; drop it for mode {rule.mode!r}.")
  return tuple(rules)


def rule_for(rules: Sequence[Rule], path: str) -> Rule | None:
  """The first rule whose pattern fully matches `path`, or None."""
  return next((rule for rule in rules if re.fullmatch(rule.pattern, path)), None)


def check_coverage(rules: Sequence[Rule], layers: dict[str, str], kinds: Sequence[str],
                   framework: str) -> None:
  """Every rule matches a layer, and every matched layer is of a supported kind.

  Args:
    rules: checked rules.
    layers: {module path: class name} of the modules that own a kernel.
    kinds: the supported class names.
    framework: 'nn' or 'nnx', for the messages.
  """
  for rule in rules:
    matched = [path for path in layers if re.fullmatch(rule.pattern, path)]
    if not matched:
      raise QuantizationError(
          f'rule pattern {rule.pattern!r} matches no layer (the layers are '
          f'{", ".join(layers) or "none"}); fix the regular expression.')
  for path, kind in layers.items():
    rule = rule_for(rules, path)
    if rule is not None and kind not in kinds:
      raise QuantizationError(
          f'layer {path!r} is a {framework}.{kind}, which the quantizer does not support '
          f'({", ".join(kinds)}); narrow rule pattern {rule.pattern!r} to exclude it.')


def quantize_kernel(kernel, rule: Rule) -> quantize.QArray:
  """The kernel's symmetric codes as `rule` says (the one quantize call)."""
  return quantize.quantize(kernel, bits=rule.bits, axis=rule.axis, symmetric=True)


def fake_quantize_kernel(kernel, rule: Rule):
  """`dequantize(quantize_kernel(kernel, rule))` forward, identity gradient (QAT)."""
  return qat.fake_quantize(kernel, bits=rule.bits, axis=rule.axis, symmetric=True)
