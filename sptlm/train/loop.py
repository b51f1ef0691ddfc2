"""The training loop that `sptlm train` and `sptlm tokenizer train` share.

Both trainers resume, checkpoint, log, stop and report divergence the same way; this module is
that one way, so a fix reaches both. A trainer brings its mesh, input and program, then calls
`restore_or_init` and `run`, saying what a step's work is (tokens, for the throughput), which
of a step's metrics make its metrics.jsonl row, and what else runs periodically (an eval).

Step n-1's metrics are fetched only after step n is dispatched, so the host never stalls the
device; the first step (which compiles) and periodic work are left out of the throughput.

What a run promises (README, "Resuming"): nothing in the work directory is touched before the
newest good checkpoint is found to fit the config (`restore_or_init`); config.json of an
earlier segment is kept when the config changes (`write_config`); a full disk stops the run
with one line and leaves the last committed checkpoint intact.
"""

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
from etils import epath
from tqdm import tqdm

from sptlm.config import TrainConfig
from sptlm.errors import UserError
from sptlm.train import checkpoint as checkpoint_lib
from sptlm.train import metrics as metrics_lib
from sptlm.train.stop import StopSignal

log = logging.getLogger(__name__)

State = Any  # a train state: a pytree of (sharded) arrays
Metrics = dict[str, Any]  # one step's metrics, fetched to the host
# (fetched metrics, {counter: per second over the window}) -> (metrics.jsonl row, bar postfix)
Report = Callable[[Metrics, dict[str, float]], tuple[dict[str, Any], dict[str, str]]]


class TrainingError(UserError, RuntimeError):
  """The run cannot go on (diverged, or started wrongly); the message says why and what to do."""


class Program(Protocol):
  """What the loop needs of a trainer's program (sptlm.train.program, sptlm.speech.program)."""

  abstract_state: Any
  init: Callable[[], State]
  step: Any  # jitted (state, global batch) -> (state, device metrics)

  def global_batch(self, local: dict[str, Any]) -> dict[str, jax.Array]: ...


@dataclasses.dataclass(frozen=True)
class Periodic:
  """Work at every `every`-th step and at the last: fn(step, state) -> a metrics row.

  The row goes to metrics.jsonl, is printed as "step N: key value, ..." and joins the returned
  metrics; the time it takes does not count toward the throughput.
  """

  every: int
  fn: Callable[[int, State], dict[str, float]]


def check_workdir(workdir: str) -> None:
  """A work directory path that names something else stops the run before anything is done."""
  wd = epath.Path(workdir)
  if wd.exists() and not wd.is_dir():
    raise TrainingError(f"--workdir {workdir} is a file, not a directory: choose another path")


def write_config(workdir: str, config_json: str, start_step: int) -> None:
  """Writes DIR/config.json (process 0). A different config.json already there (an earlier
  segment of the run, e.g. before train.steps was raised) is kept as config.step<N>.json,
  N the step this segment starts from."""
  if jax.process_index() != 0:
    return
  wd = epath.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  path = wd / "config.json"
  if path.exists():
    old = path.read_text()
    try:
      same = json.loads(old) == json.loads(config_json)
    except ValueError:
      same = False
    if same:
      return
    keep, i = wd / f"config.step{start_step}.json", 0
    while keep.exists():
      i += 1
      keep = wd / f"config.step{start_step}.{i}.json"
    keep.write_text(old)
    log.info("the config changed; the earlier config.json is kept as %s", keep)
  path.write_text(config_json)


def planned_steps(tcfg: TrainConfig, workdir: str) -> TrainConfig:
  """Keeps the learning-rate plan of a run that is extended (train.steps raised or lowered).

  The schedule's length is train.schedule_steps, or train.steps when that is 0. A run resumed
  with another train.steps keeps the plan recorded in its config.json, so the steps already
  planned see the same learning rates, and steps past the plan hold min_learning_rate; set
  train.schedule_steps explicitly to re-plan.
  """
  path = epath.Path(workdir) / "config.json"
  if tcfg.schedule_steps or not path.exists():
    return tcfg
  try:
    old = json.loads(path.read_text())["train"]
    plan = int(old.get("schedule_steps") or old["steps"])
  except (ValueError, KeyError, TypeError):
    return tcfg
  if plan == tcfg.steps:
    return tcfg
  log.warning("train.steps is %d but this run was planned for %d steps: the learning-rate "
              "schedule keeps that plan (steps past it hold train.min_learning_rate); set "
              "--config.train.schedule_steps=%d to re-plan it", tcfg.steps, plan, tcfg.steps)
  if jax.process_index() == 0:
    print(f"learning-rate plan kept at {plan} steps (train.steps {plan} -> {tcfg.steps}); "
          f"--config.train.schedule_steps={tcfg.steps} re-plans it", flush=True)
  return dataclasses.replace(tcfg, schedule_steps=plan)


def restore_or_init(ckpt: checkpoint_lib.Checkpointer, program: Program, data_iter: Any,
                    init_from: str, keys: Sequence[str],
                    config_json: str = "", partial: bool = False) -> tuple[int, State]:
  """(start step, state): the work directory's newest good checkpoint, with `data_iter` set to
  its position; else a fresh state with `keys` (e.g. "params") copied from the newest
  checkpoint in `init_from`, when given; else a fresh state. A checkpoint that does not fit
  the config raises CheckpointMismatch (naming the differing keys of `config_json`) before
  anything is written. With `partial` (train.init_partial), `init_from`'s arrays are copied
  where the config has them and the config's other arrays keep their fresh init."""
  restored = ckpt.restore(program.abstract_state, data_iter,
                          json.loads(config_json) if config_json else None)
  if restored is not None:
    step, state = restored
    log.info("resuming from checkpoint at step %d", step)
    return step, state
  state = program.init()
  if init_from:
    src = checkpoint_lib.Checkpointer(init_from, keep=2, async_save=False, read_only=True)
    step = src.latest_step()
    if step is None:
      raise TrainingError(f"train.init_from={init_from!r} holds no checkpoint")
    if partial:
      got, fresh = src.restore_matching(step, program.abstract_state, tuple(keys))
      state = jax.tree_util.tree_map_with_path(
          lambda p, x: got.get(checkpoint_lib.leaf_name(p), x), state)
      log.info("initialised %d arrays from %s (step %d); %d keep their fresh init%s",
               len(got), init_from, step, len(fresh), f": {', '.join(fresh[:8])}" if fresh else "")
    else:
      loaded = src.restore_state(step, program.abstract_state)
      state = dict(state, **{k: loaded[k] for k in keys})
      log.info("initialised parameters from %s (step %d)", init_from, step)
    src.close()
  return 0, state


def already_complete(tcfg: TrainConfig, start_step: int) -> bool:
  """Says so (and how to go on) when the restored run has reached train.steps."""
  if start_step < tcfg.steps:
    return False
  if jax.process_index() == 0:
    print(f"the run is already complete: its checkpoint is at step {start_step} and "
          f"train.steps={tcfg.steps}. To train further, raise it, e.g. "
          f"--config.train.steps={start_step * 2}", flush=True)
  return True


def run(tcfg: TrainConfig, workdir: str, config_json: str, *, program: Program, state: State,
        start_step: int, data_iter: Iterator[Any], ckpt: checkpoint_lib.Checkpointer,
        stop: StopSignal, counts: Callable[[Metrics], dict[str, float]], report: Report,
        periodic: Sequence[Periodic] = ()) -> dict[str, Any]:
  """Trains from `start_step` until tcfg.steps or an agreed stop; returns the last logged row.

  `counts(m)` is the work one step's metrics stand for ({"tokens_per_s": real tokens, ...});
  `report` gets each counter per second of the window. A log row (`report`) is written every
  tcfg.log_every steps and at the last; a checkpoint every tcfg.checkpoint_every steps, at the
  last and on a stop. A non-finite loss raises TrainingError; a full disk, DiskFull. `ckpt`
  and `stop` are closed and restored whatever happens.
  """
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step)
  bar = tqdm(total=tcfg.steps, initial=start_step, disable=jax.process_index() != 0,
             unit="step", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
  pending: tuple[int, Any] | None = None  # (step number, device metrics) not yet fetched
  last: dict[str, Any] = {}
  window: dict[str, float] = {"t": time.perf_counter()}  # the throughput's current window
  started = time.perf_counter()
  last_good = start_step

  def restart_window() -> None:
    window.clear()
    window["t"] = time.perf_counter()

  def finish() -> None:
    """Fetches the pending step's metrics, stops on a non-finite loss, logs every log_every."""
    nonlocal pending
    if pending is None:
      return
    (step_number, device_metrics), pending = pending, None
    m = jax.device_get(device_metrics)
    if not math.isfinite(float(m["loss"])):
      raise TrainingError(
          f"loss is {float(m['loss'])} at step {step_number}; stopping. The last good "
          f"checkpoint (step {last_good}) is intact: lower train.learning_rate or check the "
          "data, then rerun the same command to resume from it")
    for k, v in counts(m).items():
      window[k] = window.get(k, 0.0) + float(v)
    if step_number % tcfg.log_every == 0 or step_number == tcfg.steps:
      seconds = max(time.perf_counter() - window["t"], 1e-9)
      row, postfix = report(m, {k: v / seconds for k, v in window.items() if k != "t"})
      row["elapsed_s"] = time.perf_counter() - started  # this process's time in the loop so far
      writer.write(step_number, row)
      bar.set_postfix(**postfix)
      restart_window()
      last.update(row, step=step_number)

  try:
    step = start_step
    while step < tcfg.steps:
      state, metrics = program.step(state, program.global_batch(next(data_iter)))
      step += 1
      finish()  # the previous step's, now that this one is dispatched
      pending = (step, metrics)
      if step == start_step + 1:  # the first step compiles: restart the rate window
        finish()
        restart_window()
      bar.update(1)
      for work in periodic:
        if step % work.every == 0 or step == tcfg.steps:
          finish()
          row = work.fn(step, state)
          writer.write(step, row)
          tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
          last.update(row)
          restart_window()  # periodic work is not training throughput
      stopping = stop.agreed()  # once per step on every process
      if step % tcfg.checkpoint_every == 0 or step == tcfg.steps or stopping:
        finish()
        ckpt.save(step, state, data_iter, config_json)
        last_good = step
      if stopping:
        tqdm.write(f"{stop.received or 'a stop signal (on another process)'} received: saved "
                   f"a checkpoint at step {step}; rerun the same command to resume")
        break
    finish()
    ckpt.wait()
  except OSError as e:
    if checkpoint_lib.is_disk_full(e):
      raise checkpoint_lib.DiskFull(
          f"no space left on device while writing to {workdir} ({e.filename or 'metrics'}); "
          f"the checkpoint of step {last_good} is intact: free space, then rerun the same "
          "command to resume") from e
    raise
  finally:
    bar.close()
    try:
      ckpt.wait()
    finally:
      ckpt.close()
      writer.close()
      stop.restore()  # last: a SIGTERM during the final checkpoint write must not kill it
  return last
