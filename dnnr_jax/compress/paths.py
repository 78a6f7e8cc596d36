"""Leaf paths of a params pytree, and which leaves a set of patterns selects.

Pruning and quantization both act on the leaves whose '/'-joined path (e.g.
'trunk_0/kernel') fully matches one of a few regular expressions; this
module is the one place that names paths and matches them.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax

from dnnr_jax.errors import DnnrError

# Every Dense kernel; biases are left alone.
DEFAULT_PATTERNS = (r'.*/kernel$',)
Patterns = str | Sequence[str]
IsLeaf = Callable[[Any], bool] | None


def is_none(node: Any) -> bool:
  """`is_leaf` for mask pytrees, whose `None` leaves stand for unselected params."""
  return node is None


def path_name(key_path: Sequence[Any]) -> str:
  """'trunk_0/kernel' for the key path of `params['trunk_0']['kernel']`."""
  return jax.tree_util.keystr(tuple(key_path), simple=True, separator='/')


def param_paths(params: Any, *, is_leaf: IsLeaf = None) -> list[str]:
  """'trunk_0/kernel'-style paths of every leaf, in flattening order."""
  return [path_name(key_path) for key_path, _ in
          jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)[0]]


def select(params: Any, patterns: Patterns = DEFAULT_PATTERNS, *, is_leaf: IsLeaf = None) -> Any:
  """A bool per leaf: True where a pattern fully matches its path.

  Args:
    params: a params pytree.
    patterns: one regular expression or several.
    is_leaf: as for `jax.tree_util` (e.g. to keep a QArray whole).

  Raises:
    DnnrError: a pattern is not a regular expression or matches no path (a
      typo would otherwise silently select nothing).
  """
  if isinstance(patterns, str):
    patterns = (patterns,)
  paths = param_paths(params, is_leaf=is_leaf)
  compiled = []
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as error:
      raise DnnrError(f'pattern {pattern!r} is not a regular expression ({error}); '
                      'fix its syntax.') from error
    if not any(regex.fullmatch(path) for path in paths):
      raise DnnrError(f'pattern {pattern!r} matches no parameter; available paths: '
                      f'{", ".join(paths)}; fix the regular expression.')
    compiled.append(regex)
  return jax.tree_util.tree_map_with_path(
      lambda key_path, _: any(regex.fullmatch(path_name(key_path)) for regex in compiled),
      params, is_leaf=is_leaf)
