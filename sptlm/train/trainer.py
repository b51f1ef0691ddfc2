"""`sptlm train`: the language model's training, top to bottom.

Mesh -> stop signal -> input -> program (model, optimizer, shardings, step) -> restore or
init -> summary -> loop. The loop, its checkpoints, metrics, resume and stop are
sptlm.train.loop's, shared with `sptlm tokenizer train`; this file says what is the LM's own:
its input, program, metrics row and throughput (steps x tokens per step, and MFU).
"""

import dataclasses
from typing import Any

import jax
from etils import epath

from data_pipelines import mixture_input, text_input
from sptlm import config as config_lib
from sptlm import paths, sharding
from sptlm.config import Config
from sptlm.eval import during_training
from sptlm.train import checkpoint as checkpoint_lib
from sptlm.train import flops as flops_lib
from sptlm.train import loop
from sptlm.train import program as program_lib
from sptlm.train.loop import TrainingError
from sptlm.train.stop import StopSignal


def train(cfg: Config, workdir: str) -> dict[str, Any]:
  """Trains until train.steps (or a stop signal); returns the last logged metrics."""
  loop.check_workdir(workdir)
  during_training.check(cfg)
  cfg = dataclasses.replace(cfg, train=loop.planned_steps(cfg.train, workdir))
  tcfg, dcfg = cfg.train, cfg.data
  config_json = config_lib.to_json(cfg)

  # ---- Mesh --------------------------------------------------------------------------------
  mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                             "tensor": cfg.mesh.tensor})
  stop = StopSignal(mesh)  # from here on, a preemption during start-up also ends in a checkpoint

  # ---- Input -------------------------------------------------------------------------------
  data_iter, stats = _input(cfg)

  # ---- Program: model, optimizer, shardings, step ------------------------------------------
  task_names = getattr(stats, "task_names", ("text",))
  program = program_lib.build(cfg, mesh, task_names)

  # ---- Restore or initialise ---------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=tcfg.keep_checkpoints,
                                     async_save=tcfg.async_checkpoints)
  start_step, state = loop.restore_or_init(ckpt, program, data_iter, tcfg.init_from, ("params",),
                                           config_json, tcfg.init_partial)
  loop.write_config(workdir, config_json, start_step)  # only now: the checkpoint fits
  if loop.already_complete(tcfg, start_step):
    ckpt.close()
    stop.restore()
    return {"step": start_step}
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  unsharded = sharding.check_sharded(flat)
  if unsharded:
    raise TrainingError("large parameters are replicated on every device although the mesh "
                        f"has {mesh.size}: {', '.join(unsharded[:3])}; check mesh.rules")

  # ---- Summary -----------------------------------------------------------------------------
  peak = flops_lib.peak_flops_per_device()
  total_peak = peak[0] * (1 if jax.devices()[0].platform == "cpu" else jax.device_count())
  step_flops = flops_lib.train_flops_per_step(cfg.model, program.vocab.size, dcfg.seq_len,
                                              dcfg.global_batch_size)
  tokens_per_step = dcfg.global_batch_size * dcfg.seq_len
  if jax.process_index() == 0:
    print(_summary(cfg, program, stats, workdir, start_step, peak), flush=True)

  # ---- Loop --------------------------------------------------------------------------------
  periodic = []
  if cfg.eval.every:  # README: Evaluation during training
    periodic.append(loop.Periodic(cfg.eval.every, during_training.make(cfg, workdir, mesh)))

  def report(m: loop.Metrics, rates: dict[str, float]) -> tuple[dict[str, Any], dict[str, str]]:
    """tokens_per_s: real (non-padding) tokens; padded_tokens_per_s: all positions computed."""
    padded = rates["padded_tokens_per_s"]
    row = {"loss": m["loss"], "loss_text": m["loss_text"], "loss_speech": m["loss_speech"],
           "grad_norm": m["grad_norm"], "lr": m["lr"], "tokens_per_s": rates["tokens_per_s"],
           "padded_tokens_per_s": padded,
           "mfu": padded / tokens_per_step * step_flops / total_peak}
    if len(task_names) > 1:
      row.update({f"loss_task_{n}": v for n, v in zip(task_names, m["loss_tasks"])})
    return row, {"loss": f"{float(m['loss']):.4f}", "tok_s": f"{rates['tokens_per_s']:,.0f}"}

  try:
    return loop.run(tcfg, workdir, config_json, program=program, state=state,
                    start_step=start_step, data_iter=data_iter, ckpt=ckpt, stop=stop,
                    counts=lambda m: {"tokens_per_s": m["tokens"],
                                      "padded_tokens_per_s": tokens_per_step},
                    report=report, periodic=periodic)
  finally:
    data_iter.close()  # grain worker processes (data.workers), if any


def _input(cfg: Config) -> tuple[Any, Any]:
  """(this host's batch iterator, its statistics): the materialized mixture when data.shards
  is set, else the text corpus."""
  d = cfg.data
  common = dict(seq_len=d.seq_len, global_batch=d.global_batch_size, num_shards=d.num_shards,
                packing_bins=d.packing_bins, seed=cfg.train.seed,
                process_index=jax.process_index(), process_count=jax.process_count())
  if d.shards:
    return mixture_input.shard_batches(str(paths.resolve(d.shards)), rates=dict(d.rates),
                                       workers=d.workers, **common,
                                       vocab_sizes=program_lib.vocabulary(cfg))
  return text_input.corpus_batches(paths.resolve(d.corpus), paths.resolve(cfg.vocab.text_tokenizer),
                                   text_size=cfg.vocab.text_size, **common)


def _data_line(stats: Any) -> str:
  if isinstance(stats, mixture_input.MixtureStats):
    shares = ", ".join(f"{n} {stats.token_shares[n]:.0%}" for n in stats.task_names)
    return (f"{sum(stats.examples.values()):,} examples, {stats.tokens:,} tokens in "
            f"{len(stats.task_names)} tasks (token shares: {shares})")
  return (f"{stats.documents:,} documents ({stats.skipped_empty} empty skipped), "
          f"{stats.tokens:,} tokens, {stats.examples:,} examples")


def _summary(cfg: Config, program: program_lib.Program, stats: Any,
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
      f"  data            {_data_line(stats)}",
      f"  steps           {start_step} -> {cfg.train.steps}",
      f"  peak FLOP/s     {peak[0]:.3g} per device, {peak[1]}",
      f"  checkpoints     {epath.Path(workdir) / 'checkpoints'}",
      f"  metrics         {epath.Path(workdir) / 'metrics.jsonl'} and tensorboard/",
  ])
