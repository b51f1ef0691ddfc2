"""Run metrics to DIR/metrics.jsonl (full precision, flushed per line) and TensorBoard."""

import importlib
import json
import logging
import math
import sys
from typing import Any

import jax
from etils import epath

log = logging.getLogger(__name__)


def summary_writer(logdir: str, **kwargs: Any) -> Any:
  """A tensorboardX SummaryWriter, imported without torch where torch is not loaded yet.

  tensorboardX imports torch at module level only to accept torch tensors, which we never
  pass; with jax already loaded, importing the writer took 8-10 s with torch and 3.3 s
  without it on 2 busy CPU cores.
  """
  if "tensorboardX.writer" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which it catches
    try:
      importlib.import_module("tensorboardX")
    finally:
      del sys.modules["torch"]
  from tensorboardX import SummaryWriter
  return SummaryWriter(logdir, **kwargs)


def _history(path: epath.Path, resume_step: int) -> list[str]:
  """The rows of an earlier segment that the restored checkpoint covers (step <= resume_step).

  Rows past it were logged by a run killed after its last checkpoint; they are redone, with
  the same values. A line that is not JSON (a kill in the middle of a write) is dropped with
  a warning. Starting from step 0 over a non-empty history keeps the old file whole, as
  metrics.before_step0[.N].jsonl.
  """
  rows, torn = [], 0
  for line in path.read_bytes().decode("utf-8", "replace").splitlines():
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      step = int(row["step"])
    except (ValueError, KeyError, TypeError):
      torn += 1
      continue
    rows.append((step, line))
  if torn:
    log.warning("%s: dropped %d unreadable line(s) (a run killed while writing)", path, torn)
  if resume_step == 0 and rows:
    keep, i = path.parent / "metrics.before_step0.jsonl", 0
    while keep.exists():
      i += 1
      keep = path.parent / f"metrics.before_step0.{i}.jsonl"
    keep.write_text(path.read_bytes().decode("utf-8", "replace"))
    log.warning("starting from step 0: the earlier %s is kept as %s", path.name, keep.name)
  return [line for step, line in rows if step <= resume_step]


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
      self.rows = _history(self.path, resume_step)
      self.path.write_text("".join(line + "\n" for line in self.rows))
    self.file = self.path.open("a") if self.local else None
    self.tb = summary_writer(str(epath.Path(workdir) / "tensorboard"), purge_step=(
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
