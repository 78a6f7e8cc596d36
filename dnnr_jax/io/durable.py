"""Writing artifacts so that nothing is lost: one writer, early failure, safe swaps, fsync.

One writer per output. `writer_lock(target)` holds an exclusive `fcntl.flock`
on `.NAME.lock` beside `target` for as long as a job writes it; a second run on
the same output is refused before it does any work. The kernel drops the lock
when its process dies, however it dies, so a stale lock file never blocks a
later run. Creating the lock file is also the check, before any work, that the
output's folder is a writable directory.

Replacing a version (`replace_directory`), with a crash possible at any point:

1. the new version is written complete under `.NAME.partial`, then fsynced;
2. the old version is renamed to `.NAME.old`;
3. `.NAME.partial` is renamed to `NAME`;
4. `.NAME.old` is renamed to `.NAME.trash`, which is then deleted.

At every moment a complete version sits at `NAME` or at `.NAME.old`. The next
writer of `NAME` calls `recover(NAME)` before any work: a `.NAME.old` without a
`NAME` (a crash between 2 and 3) is renamed back to `NAME`, so the old version
returns; a `.NAME.old` beside a `NAME` (a crash between 3 and 4) is the version
the finished replacement superseded and goes to the trash. `.NAME.partial` and
`.NAME.trash` (and Orbax's temporary folders beside them) are never a version
anyone asked to keep and are deleted.

Durability: every file and folder of a saved artifact is fsynced before it is
renamed into place, and the parent folder after, so a finished save survives a
crash of the machine, not only of the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
from typing import Callable, TypeVar

from dnnr_jax.errors import DnnrError

_Job = TypeVar('_Job', bound=Callable)
_HELD: dict[pathlib.Path, list] = {}  # target -> [fd, depth, top folder the lock created]
_SCOPES: list[list[pathlib.Path]] = []


def staging_path(target: pathlib.Path) -> pathlib.Path:
  return target.with_name(f'.{target.name}.partial')


def retired_path(target: pathlib.Path) -> pathlib.Path:
  return target.with_name(f'.{target.name}.old')


def check_writable_dir(directory: str | os.PathLike, what: str = 'output', *,
                       create: bool = True, keep: bool = False) -> pathlib.Path | None:
  """Proves a file can be written in `directory`, creating it first if `create`.

  Folders it creates are removed again unless `keep`, so a run that fails
  later leaves nothing behind.

  Returns:
    With `keep`, the top-most folder it created (None if all existed).

  Raises:
    DnnrError: it is missing (without `create`), a file, a device, read-only
      or otherwise unwritable.
  """
  directory = pathlib.Path(directory).absolute()
  created = None
  try:
    if create:
      created = next((folder for folder in reversed([directory, *directory.parents])
                      if not folder.exists()), None)
      directory.mkdir(parents=True, exist_ok=True)
    handle, probe = tempfile.mkstemp(dir=directory, prefix='.dnnr-probe-')
    os.close(handle)
    os.unlink(probe)
  except OSError as error:
    raise DnnrError(
        f'cannot write the {what} in {directory}: it is not a writable directory '
        f'({error.strerror or type(error).__name__}); choose another folder.') from None
  if keep:
    return created
  remove_empty_folders(directory, created)
  return None


def remove_empty_folders(directory: pathlib.Path, top: pathlib.Path | None) -> None:
  """Removes `directory` and its parents up to `top` while they are empty."""
  if top is None:
    return
  for folder in [directory, *directory.parents]:
    try:
      os.rmdir(folder)
    except OSError:
      return
    if folder == top:
      return


def acquire(target: str | os.PathLike) -> None:
  """Takes the writer lock of `target` (re-entrant within a process).

  Released by `release`, at the end of the enclosing `holding_locks` job, or
  when the process ends.

  Raises:
    DnnrError: another process is writing `target`, or its folder is not a
      writable directory.
  """
  if not _primary():  # One run of several processes: process 0 holds its locks.
    return
  target = pathlib.Path(target).absolute()
  if target in _HELD:
    _HELD[target][1] += 1
  else:
    created = check_writable_dir(target.parent, keep=True)
    try:
      _HELD[target] = [_lock(target), 1, created]
    except DnnrError:
      remove_empty_folders(target.parent, created)
      raise
  if _SCOPES:
    _SCOPES[-1].append(target)


def release(target: str | os.PathLike) -> None:
  target = pathlib.Path(target).absolute()
  held = _HELD.get(target)
  if held is None:
    return
  held[1] -= 1
  if held[1] == 0:
    del _HELD[target]
    with contextlib.suppress(OSError):
      os.unlink(_lock_path(target))  # While still locked: no one else holds this file.
    os.close(held[0])
    remove_empty_folders(target.parent, held[2])  # Only folders this lock created.


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike):
  """Holds the writer lock of `target` for the `with` block."""
  acquire(target)
  try:
    yield
  finally:
    release(target)


def holding_locks(job: _Job) -> _Job:
  """Decorates a job: locks it `acquire`s are released when it returns or raises."""
  @functools.wraps(job)
  def wrapper(*args, **kwargs):
    _SCOPES.append([])
    try:
      return job(*args, **kwargs)
    finally:
      for target in _SCOPES.pop():
        release(target)
  return wrapper


def recover(target: str | os.PathLike) -> None:
  """Finishes or undoes a replacement that a crash interrupted (see the module doc)."""
  if not _primary():  # Process 0 alone moves a run's directories.
    return
  target = pathlib.Path(target)
  retired = retired_path(target)
  if retired.exists():
    if target.exists():
      _discard(retired)
    else:
      os.rename(retired, target)
      fsync_dir(target.parent)
  # The staging folder, Orbax's temporary folder inside it, a trash folder.
  for pattern in (f'.{target.name}.partial*', f'.{target.name}.trash'):
    for leftover in target.parent.glob(pattern):
      shutil.rmtree(leftover)


def replace_directory(staging: pathlib.Path, target: pathlib.Path) -> None:
  """Moves the complete folder `staging` to `target`, replacing any old one safely."""
  fsync_tree(staging)
  if target.exists():
    retired = retired_path(target)
    os.rename(target, retired)
    os.rename(staging, target)
    fsync_dir(target.parent)
    _discard(retired)
  else:
    os.rename(staging, target)
  fsync_dir(target.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` whole or not at all, fsynced."""
  path = pathlib.Path(path)
  temporary = path.with_name(f'.{path.name}.partial')
  with open(temporary, 'wb') as stream:
    stream.write(data)
    stream.flush()
    os.fsync(stream.fileno())
  os.replace(temporary, path)
  fsync_dir(path.parent)
  return path


def fsync_tree(root: pathlib.Path) -> None:
  """fsyncs every file and folder under `root`, folders after their contents."""
  for folder, _, files in os.walk(root, topdown=False):
    for name in files:
      descriptor = os.open(os.path.join(folder, name), os.O_RDONLY)
      try:
        os.fsync(descriptor)
      finally:
        os.close(descriptor)
    fsync_dir(folder)


def fsync_dir(folder: str | os.PathLike) -> None:
  descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


@contextlib.contextmanager
def deferred_interrupt():
  """Holds back Ctrl-C (SIGINT) until the block ends, then raises KeyboardInterrupt.

  Around a save: an interrupt neither cuts it short nor lands inside Orbax's
  waits (which log it as an error with a traceback). Outside the main thread,
  where Python delivers no signals, it does nothing.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if received and callable(previous):
    previous(signal.SIGINT, None)


def _discard(retired: pathlib.Path) -> None:
  trash = retired.with_name(retired.name.removesuffix('.old') + '.trash')
  os.rename(retired, trash)  # Never a half-deleted `.old` that `recover` would restore.
  shutil.rmtree(trash)


def _primary() -> bool:
  """Whether this is process 0 of a multi-process JAX run (or no such run)."""
  jax = sys.modules.get('jax')  # Never imported here: `dnnr predict` runs without JAX.
  return jax is None or jax.process_index() == 0


def _lock_path(target: pathlib.Path) -> pathlib.Path:
  return target.with_name(f'.{target.name}.lock')


def _lock(target: pathlib.Path) -> int:
  path = _lock_path(target)
  while True:
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = os.read(descriptor, 64).decode(errors='replace').strip() or 'unknown'
      os.close(descriptor)
      raise DnnrError(
          f'{target} is being written by another dnnr run (process {owner}); wait for it '
          'to finish or choose another version.') from None
    # The holder before us may have unlinked the file it locked: lock the live one.
    try:
      same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      os.ftruncate(descriptor, 0)
      os.write(descriptor, str(os.getpid()).encode())
      return descriptor
    os.close(descriptor)
