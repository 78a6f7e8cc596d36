"""Removing versions from a models folder without orphaning what was made from them.

`plan_rm` and `plan_gc` decide, from metadata alone, what would go; `remove`
deletes exactly that. A checkpoint goes with its ONNX exports and its model
card (they are the same version in other forms); a checkpoint that another
version was pruned or quantized from stays unless forced. Each path is
first renamed to a hidden `.NAME.trash`, so an interrupted removal leaves
no half-deleted directory that still looks like a version.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil

from dnnr_jax.errors import DnnrError
from dnnr_jax.io.model_details import card_path
from dnnr_jax.io.registry import KINDS, Entry, Registry, locate, scan


@dataclasses.dataclass(frozen=True)
class Removal:
  """What `remove` would delete.

  Attributes:
    entries: the versions removed (checkpoints with their exports).
    paths: every file and directory to delete, cards included.
    orphaned: versions left behind whose parent goes (only with `force`).
  """
  entries: tuple[Entry, ...]
  paths: tuple[pathlib.Path, ...]
  orphaned: tuple[Entry, ...] = ()


def plan_rm(models_dir: str | os.PathLike, ref: str, *, force: bool = False) -> Removal:
  """What removing the entry `ref` names deletes.

  Raises:
    DnnrError: `ref` names no entry or several, or other versions were made
      from it and `force` is False.
  """
  registry, entry = locate(models_dir, ref)
  derived = _derived_versions(registry, entry)
  if derived and not force:
    raise DnnrError(
        f"{entry.ref} is the source of {', '.join(child.ref for child in derived)}; remove "
        'those first, or pass force to remove it anyway and leave them without their source.')
  return _removal(registry, [entry], orphaned=derived)


def plan_gc(models_dir: str | os.PathLike, keep: int) -> Removal:
  """All but the newest `keep` unreferenced checkpoints of each kind, with their exports.

  A checkpoint another version was made from is referenced and always kept,
  as are unfinished saves (a save may be running) and exports whose
  checkpoint is gone. Newest is by creation time, then version.

  Raises:
    DnnrError: `keep` is negative, or `models_dir` does not exist.
  """
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
    raise DnnrError(f'keep {keep!r} is not a non-negative integer; pass e.g. 3.')
  registry = scan(models_dir)
  doomed = []
  for kind in KINDS:
    candidates = [entry for entry in registry.entries
                  if entry.kind == kind and entry.format == 'orbax'
                  and entry.state != 'incomplete' and not _derived_versions(registry, entry)]
    candidates.sort(key=_age, reverse=True)
    doomed += candidates[keep:]
  return _removal(registry, doomed)


def remove(removal: Removal) -> None:
  """Deletes every path of `removal`; a path already gone is skipped."""
  for path in removal.paths:
    if not os.path.lexists(path):
      continue
    trash = path.with_name(f'.{path.name}.trash')
    if os.path.lexists(trash):
      _delete(trash)
    os.rename(path, trash)
    _delete(trash)


def _removal(registry: Registry, entries: list[Entry], orphaned=()) -> Removal:
  chosen: list[Entry] = []
  for entry in entries:
    chosen.append(entry)
    if entry.format == 'orbax':
      chosen += [child for child in registry.children(entry) if child.format == 'onnx']
  paths = []
  for entry in dict.fromkeys(chosen):
    paths.append(entry.path)
    if entry.format == 'orbax' and card_path(entry.path).exists():
      paths.append(card_path(entry.path))
  return Removal(tuple(dict.fromkeys(chosen)), tuple(paths), tuple(orphaned))


def _derived_versions(registry: Registry, entry: Entry) -> tuple[Entry, ...]:
  """Checkpoints pruned or quantized from `entry` (its own exports aside)."""
  return tuple(child for child in registry.children(entry) if child.format == 'orbax')


def _age(entry: Entry):
  version = tuple(int(part) for part in (entry.version or '').split('.') if part.isdigit())
  return entry.created or '', version


def _delete(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  else:
    path.unlink()
