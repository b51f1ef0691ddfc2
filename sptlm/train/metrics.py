"""Run metrics to DIR/metrics.jsonl (full precision, flushed per line) and TensorBoard."""

import json
import math
from typing import Any

import jax
from etils import epath


class MetricsWriter:
  """Writes from process 0 only; other processes get a writer that does nothing.

  Local files are appended and flushed per row. Object stores (gs://) cannot append, so there
  the whole file is rewritten at each logged step (it is small) and history survives resumes.
  """

  def __init__(self, workdir: str, *, resume_step: int):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.local = "://" not in str(workdir)
    self.rows: list[str] = []
    if self.path.exists():
      # Drop entries a killed run logged past its last checkpoint: they will be redone.
      keep_to = resume_step
      self.rows = [line for line in self.path.read_text().splitlines()
                   if line.strip() and json.loads(line).get("step", 0) <= keep_to]
      self.path.write_text("".join(line + "\n" for line in self.rows))
    self.file = self.path.open("a") if self.local else None
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"), purge_step=(
        resume_step + 1 if resume_step else None))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.active:
      return
    row = {"step": step}
    for k, v in metrics.items():
      v = float(v) if v is not None else None
      row[k] = None if v is not None and math.isnan(v) and k != "loss" else v
    line = json.dumps(row)
    if self.local:
      self.file.write(line + "\n")
      self.file.flush()
    else:
      self.rows.append(line)
      self.path.write_text("".join(r + "\n" for r in self.rows))
    for k, v in row.items():
      if k != "step" and v is not None:
        self.tb.add_scalar(f"train/{k}", v, step)
    self.tb.flush()

  def close(self) -> None:
    if self.active:
      if self.file is not None:
        self.file.close()
      self.tb.close()
