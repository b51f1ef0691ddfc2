"""SIGTERM (a preempted TPU VM) and SIGINT as a stop that every process of a run agrees on."""

import signal
from typing import Any

import jax
import numpy as np


class StopSignal:
  """Turns SIGTERM (a preempted TPU VM) and SIGINT into a stop that all processes agree on.

  With several processes, a signal may reach them at different steps; each step's local flag
  goes into a tiny asynchronous all-reduce, and every process reads the previous step's result
  at the same point of the loop, so all of them stop (and checkpoint) at the same step. Create
  it right after the mesh, so that a preemption during start-up also ends in a checkpoint.
  """

  def __init__(self, mesh: jax.sharding.Mesh):
    self.received: str | None = None
    self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    self._multi = jax.process_count() > 1
    if self._multi:
      devices = mesh.devices.flatten()
      self._votes = jax.sharding.NamedSharding(
          jax.sharding.Mesh(devices, ("all",)), jax.sharding.PartitionSpec("all"))
      self._any = jax.jit(lambda v: v.max(), out_shardings=jax.sharding.NamedSharding(
          jax.sharding.Mesh(devices, ("all",)), jax.sharding.PartitionSpec()))
      self._pending = None

  def _handle(self, signum: int, _frame: Any) -> None:
    self.received = signal.Signals(signum).name

  def agreed(self) -> bool:
    """Whether to stop after this step; call exactly once per step on every process."""
    if not self._multi:
      return self.received is not None
    local = np.full((jax.local_device_count(),), self.received is not None, np.int32)
    vote = self._any(jax.make_array_from_process_local_data(self._votes, local))
    previous, self._pending = self._pending, vote
    return previous is not None and bool(jax.device_get(previous))

  def restore(self) -> None:
    """Puts back the signal handlers that were there before."""
    for s, handler in self._old.items():
      signal.signal(s, handler)
