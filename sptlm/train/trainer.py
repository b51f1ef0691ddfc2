"""`sptlm train`: the training loop, top to bottom.

Mesh -> input -> program (model, optimizer, shardings, step) -> restore or init -> loop.
Periodic work (logging, checkpoints) is a small function called at `step % every == 0`;
step n-1's metrics are fetched only after step n is dispatched, so the host never stalls
the device.
"""

import logging
import math
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from data_pipelines import text_input
from sptlm import config as config_lib
from sptlm import paths, sharding
from sptlm.config import Config
from sptlm.train import checkpoint as checkpoint_lib
from sptlm.train import flops as flops_lib
from sptlm.train import metrics as metrics_lib
from sptlm.train import program as program_lib

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  """The run cannot go on (diverged, or started wrongly); the message says why and what to do."""


class _StopSignal:
  """Turns SIGTERM (a preempted TPU VM) and SIGINT into a stop that all processes agree on.

  With several processes, a signal may reach them at different steps; each step's local flag
  goes into a tiny asynchronous all-reduce, and every process reads the previous step's result
  at the same point of the loop, so all of them stop (and checkpoint) at the same step.
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
    for s, handler in self._old.items():
      signal.signal(s, handler)


def _summary(cfg: Config, program: program_lib.Program, stats: text_input.CorpusStats,
             workdir: str, start_step: int, peak: tuple[float, str]) -> str:
  d = cfg.data
  mesh = ", ".join(f"{k}={v}" for k, v in program.mesh.shape.items())
  dev = jax.devices()[0]
  return "\n".join([
      f"sptlm train: {cfg.name}",
      f"  parameters      {program.num_params:,}",
      f"  mesh            {mesh} over {jax.device_count()} {dev.platform} device(s) "
      f"({getattr(dev, 'device_kind', '')}), {jax.process_count()} process(es)",
      f"  batch           {d.global_batch_size} x {d.seq_len} = "
      f"{d.global_batch_size * d.seq_len:,} tokens per step, {cfg.train.microbatches} "
      f"micro-batch(es)",
      f"  data            {stats.documents:,} documents ({stats.skipped_empty} empty skipped), "
      f"{stats.tokens:,} tokens, {stats.examples:,} examples",
      f"  steps           {start_step} -> {cfg.train.steps}",
      f"  peak FLOP/s     {peak[0]:.3g} per device, {peak[1]}",
      f"  checkpoints     {epath.Path(workdir) / 'checkpoints'}",
      f"  metrics         {epath.Path(workdir) / 'metrics.jsonl'} and tensorboard/",
  ])


def _initial_state(cfg: Config, program: program_lib.Program,
                   ckpt: checkpoint_lib.Checkpointer, data_iter: Any) -> tuple[int, Any]:
  """Resume from DIR's newest good checkpoint, else start from train.init_from or scratch."""
  restored = ckpt.restore(program.abstract_state, data_iter)
  if restored is not None:
    step, state = restored
    log.info("resuming from checkpoint at step %d", step)
    return step, state
  state = program.init()
  if cfg.train.init_from:
    src = checkpoint_lib.Checkpointer(cfg.train.init_from, keep=2, async_save=False)
    step = src.latest_step()
    if step is None:
      raise TrainingError(f"train.init_from={cfg.train.init_from!r} holds no checkpoint")
    loaded = src.restore_state(step, program.abstract_state)
    state = dict(state, params=loaded["params"])
    log.info("initialised parameters from %s (step %d)", cfg.train.init_from, step)
  return 0, state


def train(cfg: Config, workdir: str) -> dict[str, Any]:
  """Trains until train.steps (or a stop signal); returns the last logged metrics."""
  tcfg, dcfg = cfg.train, cfg.data
  wd = epath.Path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "config.json").write_text(config_lib.to_json(cfg))

  # ---- Mesh --------------------------------------------------------------------------------
  mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                             "tensor": cfg.mesh.tensor})
  stop = _StopSignal(mesh)  # from here on, a preemption during start-up also ends in a checkpoint

  # ---- Input -------------------------------------------------------------------------------
  data_iter, stats = text_input.corpus_batches(
      paths.resolve(dcfg.corpus), paths.resolve(cfg.vocab.text_tokenizer),
      text_size=cfg.vocab.text_size, seq_len=dcfg.seq_len,
      global_batch=dcfg.global_batch_size, num_shards=dcfg.num_shards,
      packing_bins=dcfg.packing_bins, seed=tcfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count())

  # ---- Program: model, optimizer, shardings, step ------------------------------------------
  program = program_lib.build(cfg, mesh)

  # ---- Restore or initialise ---------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=tcfg.keep_checkpoints,
                                     async_save=tcfg.async_checkpoints)
  start_step, state = _initial_state(cfg, program, ckpt, data_iter)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  unsharded = sharding.check_sharded(flat)
  if unsharded:
    raise TrainingError("large parameters are replicated on every device although the mesh "
                        f"has {mesh.size}: {', '.join(unsharded[:3])}; check mesh.rules")

  peak = flops_lib.peak_flops_per_device()
  total_peak = peak[0] * (1 if jax.devices()[0].platform == "cpu" else jax.device_count())
  step_flops = flops_lib.train_flops_per_step(cfg.model, program.vocab.size, dcfg.seq_len,
                                              dcfg.global_batch_size)
  tokens_per_step = dcfg.global_batch_size * dcfg.seq_len
  if is_main:
    print(_summary(cfg, program, stats, workdir, start_step, peak), flush=True)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step)

  # ---- Loop --------------------------------------------------------------------------------
  bar = tqdm(total=tcfg.steps, initial=start_step, disable=not is_main, unit="step",
             dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
  pending: tuple[int, Any] | None = None  # (step number, device metrics) not yet fetched
  last: dict[str, Any] = {}
  window = {"t": time.perf_counter(), "steps": 0}
  last_good = start_step

  def finish(step_number: int, device_metrics: Any) -> dict[str, Any]:
    """Fetches a step's metrics, stops on a non-finite loss, logs every log_every steps."""
    m = jax.device_get(device_metrics)
    if not math.isfinite(float(m["loss"])):
      raise TrainingError(
          f"loss is {float(m['loss'])} at step {step_number}; stopping. The last good "
          f"checkpoint (step {last_good}) is intact: lower train.learning_rate or check the "
          "data, then rerun the same command to resume from it")
    window["steps"] += 1
    if step_number % tcfg.log_every == 0 or step_number == tcfg.steps:
      elapsed = time.perf_counter() - window["t"]
      rate = window["steps"] * tokens_per_step / max(elapsed, 1e-9)
      row = {"loss": m["loss"], "loss_text": m["loss_text"], "loss_speech": m["loss_speech"],
             "grad_norm": m["grad_norm"], "lr": m["lr"], "tokens_per_s": rate,
             "mfu": rate / tokens_per_step * step_flops / total_peak}
      writer.write(step_number, row)
      bar.set_postfix(loss=f"{float(m['loss']):.4f}", tok_s=f"{rate:,.0f}")
      window.update(t=time.perf_counter(), steps=0)
      last.update(row, step=step_number)
    return m

  def save(step_number: int) -> None:
    nonlocal last_good
    ckpt.save(step_number, state, data_iter, config_lib.to_json(cfg))
    last_good = step_number

  try:
    step = start_step
    while step < tcfg.steps:
      batch = program.global_batch(next(data_iter))
      state, metrics = program.step(state, batch)
      step += 1
      if pending is not None:
        finish(*pending)
      pending = (step, metrics)
      if step == start_step + 1:  # first step includes compilation: restart the rate window
        finish(*pending)
        pending = None
        window.update(t=time.perf_counter(), steps=0)
      bar.update(1)
      stopping = stop.agreed()
      if step % tcfg.checkpoint_every == 0 or step == tcfg.steps or stopping:
        if pending is not None:
          finish(*pending)
          pending = None
        save(step)
      if stopping:
        tqdm.write(f"{stop.received or 'a stop signal (on another process)'} received: saved a checkpoint at step {step}; "
                   "rerun the same command to resume")
        break
    if pending is not None:
      finish(*pending)
  finally:
    bar.close()
    stop.restore()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return last
