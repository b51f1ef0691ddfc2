"""Orbax checkpoints of a run: train state, data iterator state and resolved config.

Saves are asynchronous and keep the newest `keep` steps. Restoring tries the newest step
first; a checkpoint that fails to restore (corrupt or partial) is moved aside to
DIR/corrupt_checkpoints/ with a warning and the one before it is used.
"""

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class Checkpointer:
  """One run's checkpoint directory (local path or gs://).

  The data iterator is anything grain's checkpoint handler takes: a grain DatasetIterator, or
  an object with get_state() -> bytes, set_state(bytes) and start_prefetch(); each process
  writes its own iterator state.
  """

  def __init__(self, workdir: str, *, keep: int, async_save: bool):
    # Orbax wants absolute paths; a relative local workdir is taken from the current directory.
    self.workdir = epath.Path(workdir if "://" in str(workdir) else
                              os.path.abspath(os.path.expanduser(str(workdir))))
    self.directory = self.workdir / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save,
                                             create=True))

  def save(self, step: int, state: Any, data_iter: Any, config_json: str) -> None:
    import json
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(json.loads(config_json))), force=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, abstract_state: Any,
              data_iter: Any | None) -> tuple[int, Any] | None:
    """(step, state) of the newest checkpoint that restores; `data_iter` is set in place."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
        self._quarantine(step, e)
        continue
      return step, restored["state"]
    return None

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """Only the train state of one step (for init_from and conversion)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def _quarantine(self, step: int, error: Exception) -> None:
    src = self.directory / str(step)
    dst = self.workdir / "corrupt_checkpoints" / str(step)
    log.warning("checkpoint %s is unreadable (%s: %s); moving it to %s and using the one "
                "before it", src, type(error).__name__, str(error).splitlines()[0][:200], dst)
    if jax.process_index() == 0:
      dst.parent.mkdir(parents=True, exist_ok=True)
      if dst.exists():
        dst.rmtree()
      src.rename(dst)
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
