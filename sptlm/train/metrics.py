"""Run metrics to DIR/metrics.jsonl (full precision, flushed per line) and TensorBoard."""

import json
import math
from typing import Any

import jax
from etils import epath


class MetricsWriter:
  """Writes from process 0 only; other processes get a writer that does nothing."""

  def __init__(self, workdir: str, *, resume_step: int | None):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    self.path = epath.Path(workdir) / "metrics.jsonl"
    if resume_step is not None and self.path.exists():
      self._truncate_after(resume_step)
    self.file = self.path.open("a")
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"), purge_step=(
        resume_step + 1 if resume_step is not None else None))

  def _truncate_after(self, step: int) -> None:
    """Drops entries a killed run logged past its last checkpoint: they will be redone."""
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.active:
      return
    row = {"step": step}
    for k, v in metrics.items():
      v = float(v) if v is not None else None
      row[k] = None if v is not None and math.isnan(v) and k != "loss" else v
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    for k, v in row.items():
      if k != "step" and v is not None:
        self.tb.add_scalar(f"train/{k}", v, step)
    self.tb.flush()

  def close(self) -> None:
    if self.active:
      self.file.close()
      self.tb.close()
