"""Joining a multi-process run: `jax.distributed.initialize`, with clear errors.

Every process runs the same command; process 0 hosts the coordinator. After
`initialize`, `jax.devices()` lists every process's devices, so the mesh of
`dnnr_jax.parallel` spans them all: each process feeds its own rows of the
data, every process writes its own Orbax shards, and process 0 alone writes
reports and ONNX files (`on_primary`): the others wait for it at a barrier of
JAX's coordination service, so that they neither run ahead into collectives
it is not in nor leave while it still works. On CPU the processes reduce
through gloo collectives.

Example (two processes on one machine):
  $ dnnr train --coordinator localhost:12355 --num-processes 2 --process-id 0 &
  $ dnnr train --coordinator localhost:12355 --num-processes 2 --process-id 1
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import os
import socket
import sys
import time
from typing import Callable, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dnnr_jax.errors import DnnrError


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """Where this process sits in a multi-process run.

  Attributes:
    coordinator: 'HOST:PORT' of process 0's coordinator; None detects the
      cluster (SLURM, Open MPI, TPU, GKE) from the environment.
    num_processes: processes in the run (None: detected).
    process_id: this process's rank, 0 .. num_processes - 1 (None: detected).
    timeout_s: how long to wait for every process to join the run, and at
      its end for every process to leave it.
    primary_timeout: seconds the other processes wait for a stage that
      process 0 runs alone (ONNX export, the report); past it they stop with
      an error, and so does process 0 when it arrives.
  """
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = 120
  primary_timeout: int = 3600


T = TypeVar('T')
# The run's settings once `initialize` joined it; a run JAX joined by other
# means (`jax.distributed.initialize` directly) waits the default.
_joined = ProcessGroup()
_barriers = itertools.count()  # Every process passes the same barriers in the same order.


def initialize(group: ProcessGroup) -> None:
  """Joins the run; call before anything else touches JAX.

  Raises:
    DnnrError: the settings are inconsistent, or the coordinator was not
      reached within `group.timeout_s`.
  """
  if group.coordinator is not None:
    if group.num_processes is None or group.process_id is None:
      raise DnnrError('a coordinator needs num_processes and process_id too; give all three.')
    if not 0 <= group.process_id < group.num_processes:
      raise DnnrError(
          f'process_id {group.process_id} is not in 0..{group.num_processes - 1}; give each '
          'process its own rank below num_processes.')
    host, _, port = group.coordinator.rpartition(':')
    if not host or not port.isdigit():
      raise DnnrError(
          f'coordinator {group.coordinator!r} is not HOST:PORT; pass e.g. localhost:12355.')
    if group.process_id != 0:
      _wait_for_coordinator(host, int(port), group.timeout_s)
  # CPU devices of several processes reduce through gloo; GPUs and TPUs ignore this.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  with _native_stdout_to_stderr():
    try:
      jax.distributed.initialize(
          coordinator_address=group.coordinator, num_processes=group.num_processes,
          process_id=group.process_id, initialization_timeout=group.timeout_s,
          shutdown_timeout_seconds=group.timeout_s)
    except (RuntimeError, ValueError) as error:  # XLA reports a timeout as RuntimeError.
      where = group.coordinator or 'the coordinator detected from the environment'
      first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ''
      raise DnnrError(
          f'could not join the run at {where} within {group.timeout_s} s ({first}); start '
          'process 0 first and check the address, or raise the timeout.') from None
    # The first collective sets up the CPU collectives' context, which waits only
    # about 30 s for the other processes; here they have just joined together,
    # not minutes apart on a busy machine.
    multihost_utils.sync_global_devices('dnnr_jax: every process joined')
  global _joined
  _joined = group


@contextlib.contextmanager
def _native_stdout_to_stderr():
  """Sends what native code prints to stdout to stderr instead, while joining.

  gloo prints '[Gloo] Rank ... is connected to ... peer ranks' to stdout when
  its context is set up (the first collective), which would break the one
  line of JSON that `--json` prints there. Python's own `sys.stdout` is
  flushed first and keeps its place; C's stdio buffer is flushed before
  stdout is given back, so nothing printed meanwhile reaches it later.
  """
  sys.stdout.flush()
  saved = os.dup(1)
  try:
    os.dup2(2, 1)
    yield
  finally:
    ctypes.CDLL(None).fflush(None)
    os.dup2(saved, 1)
    os.close(saved)


def _wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
  """Polls the coordinator's port until it accepts a connection.

  XLA's client aborts the whole process (no Python exception) when it cannot
  register in time, so an unreachable coordinator is found here first.
  """
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
        return
    except OSError as error:
      if time.monotonic() >= deadline:
        raise DnnrError(
            f'could not reach the coordinator {host}:{port} within {timeout_s} s ({error}); '
            'start process 0 first and check the address, or raise the timeout.') from None
      time.sleep(0.5)


def is_primary() -> bool:
  """Whether this process writes the files one copy of suffices for (reports, ONNX)."""
  return jax.process_index() == 0


def on_primary(stage: str, work: Callable[[], T]) -> T | None:
  """Runs `work` on process 0 alone while the others wait for it; alone, just runs it.

  `work` must not need the other processes (no collectives, no sharded
  arrays): they wait at a barrier of JAX's coordination service, which,
  unlike a collective, has a timeout (`ProcessGroup.primary_timeout`). Then
  process 0 tells them whether `work` succeeded, so that a failure stops
  every process with an error instead of leaving the others waiting.
  (JAX's public API has no barrier with a timeout: `sync_global_devices` is
  a collective; Orbax's public `multihost.get_barrier_sync_fn` is one.)

  Args:
    stage: what `work` is, for the error messages ('export', 'report').
    work: a function of no arguments.

  Returns:
    `work`'s result on process 0; None on the others.

  Raises:
    DnnrError: on the other processes, when process 0's `work` failed or did
      not end within the timeout; on process 0, when the others stopped
      waiting. Whatever `work` raised, on process 0.
  """
  if jax.process_count() == 1:
    return work()
  result, failure = None, None
  if is_primary():
    try:
      result = work()
    except BaseException as error:  # Reported to the others below, then raised here.
      failure = error
  timeout = _joined.primary_timeout
  try:
    ocp.multihost.get_barrier_sync_fn()(
        key=f'dnnr_jax:{stage}:{next(_barriers)}', timeout_ms=timeout * 1000)
  except Exception:  # XLA reports the timeout as a JaxRuntimeError.
    if failure is not None:
      raise failure from None
    if is_primary():
      raise DnnrError(
          f'the other processes stopped waiting for the {stage} stage of this process after '
          f'primary_timeout={timeout} s; give it longer.') from None
    raise DnnrError(
        f'process 0 did not finish its {stage} stage within primary_timeout={timeout} s, so '
        "this process stops; give it longer if it was still working, else see process 0's "
        'own error.') from None
  failed = multihost_utils.broadcast_one_to_all(np.int32(failure is not None))
  if failure is not None:
    raise failure
  if int(failed):
    raise DnnrError(
        f'process 0 failed in its {stage} stage (its own output says why); this process '
        'stops with it, and what was saved before the stage is kept.')
  return result
