"""Structured pruning of any params tree: whole output channels masked, by L2 norm.

A module is a params subtree with a `kernel` of two or more axes (Linen
`nn.Dense` [in, out], `nn.Conv` [*window, in, out], `nn.DenseGeneral`, or
the NNX equivalents as `nnx.state(model, nnx.Param)` nests them); its output
channels are the slices along the kernel's last axis. Rules pick modules by
regular expressions on their module path ('Conv_0', 'encoder/Dense_1'), the
first fully matching rule deciding, as quantization rules do. A channel's
score is the L2 norm of its kernel slice; the lowest round(sparsity · out)
go (at least one stays, ties keep the lower index), kernel slice and bias
entry together.

The result is an ordinary mask pytree (`prune.apply_masks`,
`gradual.keep_masked`, `prune.sparsity_report(params, masks)` all take it):
shapes are kept. The next layer's inputs from a pruned channel are then the
constant activation(0), zero for relu. Physically removing the channels
needs the model's graph (which layer reads which); `dnnr prune --method
structured` (`structured.prune_units`) does that for dnnr_jax's own models.

Example:
  >>> rules = [compress.ChannelRule('Conv_.*', 0.5), compress.ChannelRule('Dense_0', 0.25)]
  >>> masks = compress.channel_masks(params, rules)
  >>> params = compress.apply_masks(params, masks)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np

from dnnr_jax.compress.paths import is_none, path_name
from dnnr_jax.compress.structured import kept_units
from dnnr_jax.errors import DnnrError


@dataclasses.dataclass(frozen=True)
class ChannelRule:
  """Prune `sparsity` of the output channels of the modules whose path fully matches `pattern`.

  Attributes:
    pattern: a regular expression on module paths, e.g. 'Conv_.*'.
    sparsity: the fraction of channels to remove, in [0, 1).
  """
  pattern: str = '.*'
  sparsity: float = 0.5


def channel_masks(params: Any, rules: Sequence[ChannelRule]) -> Any:
  """Masks (True = keep) over the kernels and biases of the rule-matched modules.

  Args:
    params: any params pytree (nested dicts with 'kernel' and 'bias' leaves).
    rules: ChannelRules; modules no rule matches get `None` masks.

  Returns:
    A pytree like `params`: bool arrays on matched kernels and their biases
    (a bias whose last axis is the kernel's), `None` elsewhere.

  Raises:
    DnnrError: a bad rule, or a pattern that matches no module.
  """
  modules = _modules(params)
  _check_rules(rules, modules)
  chosen: dict[str, np.ndarray] = {}
  for module, kernel in modules.items():
    rule = next((r for r in rules if re.fullmatch(r.pattern, module)), None)
    if rule is None:
      continue
    kernel = np.asarray(kernel, np.float32)
    scores = np.sqrt(np.sum(np.square(kernel), axis=tuple(range(kernel.ndim - 1))))
    keep = np.zeros(kernel.shape[-1], bool)
    keep[kept_units(scores, rule.sparsity)] = True
    chosen[_join(module, 'kernel')] = keep
    chosen[_join(module, 'bias')] = keep

  def mask(key_path, leaf):
    keep = chosen.get(path_name(key_path))
    if keep is None or np.ndim(leaf) < 1 or np.shape(leaf)[-1] != keep.shape[0]:
      return None
    return jax.numpy.asarray(np.broadcast_to(keep, np.shape(leaf)))

  return jax.tree_util.tree_map_with_path(mask, params)


def pruned_channels(masks: Any) -> dict[str, tuple[int, ...]]:
  """{module path: the output channels its kernel mask removes} of `channel_masks`' result."""
  found = {}
  for key_path, keep in jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)[0]:
    name = path_name(key_path)
    if keep is not None and name.rsplit('/', 1)[-1] == 'kernel':
      kept = np.asarray(keep).reshape(-1, np.shape(keep)[-1]).any(axis=0)
      found[name.rpartition('/')[0]] = tuple(int(j) for j in np.flatnonzero(~kept))
  return found


def _modules(params: Any) -> dict[str, Any]:
  """{module path: kernel} of every leaf named 'kernel' with two or more axes."""
  found = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_name(key_path)
    if name.rsplit('/', 1)[-1] == 'kernel' and np.ndim(leaf) >= 2:
      found[name.rpartition('/')[0]] = leaf
  return found


def _check_rules(rules: Sequence[ChannelRule], modules: dict[str, Any]) -> None:
  if isinstance(rules, ChannelRule) or not rules:
    raise DnnrError(f'rules = {rules!r} is not a non-empty sequence of ChannelRule; pass e.g. '
                    "[ChannelRule('.*', 0.5)].")
  for rule in rules:
    if not isinstance(rule, ChannelRule):
      raise DnnrError(f'rule {rule!r} is not a compress.ChannelRule; build it with '
                      'ChannelRule(pattern, sparsity).')
    if not 0.0 <= rule.sparsity < 1.0:
      raise DnnrError(f'rule {rule.pattern!r} has sparsity {rule.sparsity!r}, not in [0, 1); '
                      'choose the fraction of channels to remove, e.g. 0.5.')
    try:
      regex = re.compile(rule.pattern)
    except re.error as error:
      raise DnnrError(f'rule pattern {rule.pattern!r} is not a regular expression ({error}); '
                      'fix it.') from None
    if not any(regex.fullmatch(module) for module in modules):
      raise DnnrError(f'rule pattern {rule.pattern!r} matches no module (the modules are '
                      f'{", ".join(modules) or "none"}); fix the regular expression.')


def _join(module: str, leaf: str) -> str:
  return f'{module}/{leaf}' if module else leaf
