"""`sptlm tokenizer train`: the speech tokenizer's training loop, top to bottom.

Mesh -> ASR units -> input -> program -> restore or init -> loop, with the LM trainer's own
pieces: `Checkpointer` (state, grain iterator and config; corrupt-checkpoint fallback),
`MetricsWriter` (DIR/metrics.jsonl + TensorBoard), `optimizer.make`, the logical-axis mesh,
SIGTERM handling and the non-finite-loss stop. A resumed run sees exactly the batches, dead-
code restarts (keyed by step) and losses of an uninterrupted one.

metrics.jsonl rows: step, loss, loss_ctc, loss_commit, grad_norm, lr, code_usage,
code_perplexity, codes_restarted, tokens_per_s (12.5 Hz tokens of real audio per second),
and every data.eval_every steps wer_<split> for each of data.eval_splits.
"""

import logging
import math
import pathlib
import tempfile
import time
from typing import Any

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from sptlm import paths, sharding
from sptlm.speech import config as config_lib
from sptlm.speech import corpus as corpus_lib
from sptlm.speech import input as input_lib
from sptlm.speech import program as program_lib
from sptlm.speech import units as units_lib
from sptlm.speech import wer as wer_lib
from sptlm.speech.config import SpeechTokenizerConfig
from sptlm.speech.tokenizer import UNITS_FILE, SpeechTokenizer
from sptlm.train import checkpoint as checkpoint_lib
from sptlm.train import metrics as metrics_lib
from sptlm.train.trainer import TrainingError, _StopSignal

log = logging.getLogger(__name__)


def _units(cfg: SpeechTokenizerConfig, source: corpus_lib.ManifestSource,
           wd: epath.Path) -> units_lib.Units:
  """asr.text_tokenizer, or the run's own unit model (trained once on the training split)."""
  if cfg.asr.text_tokenizer:
    path = paths.resolve(cfg.asr.text_tokenizer)
    units = units_lib.Units(path)
    if jax.process_index() == 0:
      (wd / UNITS_FILE).write_bytes(path.read_bytes())
  elif (wd / UNITS_FILE).exists():
    tmp = pathlib.Path(tempfile.mkdtemp()) / UNITS_FILE
    tmp.write_bytes((wd / UNITS_FILE).read_bytes())
    units = units_lib.Units(tmp)
  else:  # every process trains the same model (deterministic); process 0 keeps it
    tmp = pathlib.Path(tempfile.mkdtemp()) / UNITS_FILE
    texts = [u.text for u in source.utterances(cfg.data.train_split)]
    units_lib.train_units(texts, cfg.asr.units, tmp, cfg.asr.unit_type)
    if jax.process_index() == 0:
      (wd / UNITS_FILE).write_bytes(tmp.read_bytes())
    units = units_lib.Units(tmp)
  if units.size > cfg.asr.units:
    raise TrainingError(f"the ASR unit model has {units.size} units but asr.units is "
                        f"{cfg.asr.units}; raise asr.units")
  return units


def _eval_sets(cfg: SpeechTokenizerConfig,
               source: corpus_lib.ManifestSource) -> dict[str, list[corpus_lib.Utterance]]:
  out = {}
  for split in cfg.data.eval_splits:
    utts = source.utterances(split)
    n = cfg.data.eval_utterances
    out[split] = utts[:n] if n else utts
  return out


def evaluate(tok: SpeechTokenizer, source: corpus_lib.ManifestSource,
             utts: list[corpus_lib.Utterance]) -> dict[str, float]:
  """WER of transcribe, and code usage / perplexity, over `utts`."""
  audios = [source.load(u) for u in utts]
  codes = tok.encode(audios)
  hyps = tok.decode(codes)
  counts = np.bincount(np.concatenate(codes), minlength=tok.codebook_size)
  p = counts / max(counts.sum(), 1)
  nz = p[p > 0]
  return {"wer": wer_lib.wer([u.text for u in utts], hyps),
          "code_usage": float(np.mean(counts > 0)),
          "code_perplexity": float(np.exp(-np.sum(nz * np.log(nz))))}


def _summary(cfg: SpeechTokenizerConfig, program: program_lib.Program,
             data: input_lib.Prepared, shapes: list[tuple[int, int]], workdir: str,
             start_step: int) -> str:
  mesh = ", ".join(f"{k}={v}" for k, v in program.mesh.shape.items())
  dev = jax.devices()[0]
  buckets = ", ".join(f"{b} x {n / 12.5:g} s" for b, n in shapes)
  return "\n".join([
      f"sptlm tokenizer train: {cfg.name}",
      f"  parameters      {program.num_params:,} (+ codebook {cfg.vq.codebook_size} x "
      f"{cfg.model.d_model})",
      f"  mesh            {mesh} over {jax.device_count()} {dev.platform} device(s), "
      f"{jax.process_count()} process(es)",
      f"  data            {cfg.data.corpus} [{cfg.data.train_split}]: {len(data.utts):,} "
      f"utterances, {data.hours:.2f} h ({data.skipped_long} too long, {data.skipped_dense} "
      "too dense skipped)",
      f"  batches         {buckets}",
      f"  steps           {start_step} -> {cfg.train.steps}",
      f"  checkpoints     {epath.Path(workdir) / 'checkpoints'}",
      f"  metrics         {epath.Path(workdir) / 'metrics.jsonl'} and tensorboard/",
  ])


def train(cfg: SpeechTokenizerConfig, workdir: str) -> dict[str, Any]:
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
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]

  # ---- Input -------------------------------------------------------------------------------
  cache = epath.Path(dcfg.cache_dir) if dcfg.cache_dir else wd / "cache"
  source = corpus_lib.open_source(dcfg.corpus, cache_dir=pathlib.Path(str(cache)),
                                  splits=(dcfg.train_split, *dcfg.eval_splits))
  units = _units(cfg, source, wd)
  shapes = input_lib.bucket_shapes(dcfg.bucket_seconds, dcfg.batch_seconds,
                                   math.lcm(data_parallel, jax.process_count()))
  data = input_lib.prepare(source, dcfg.train_split, units, max(n for _, n in shapes),
                           cfg.model.ctc_upsample)
  data_iter = input_lib.train_iterator(
      source, data, shapes, steps=tcfg.steps, seed=tcfg.seed, num_mels=cfg.model.num_mels,
      ctc_upsample=cfg.model.ctc_upsample, short_first=dcfg.short_first,
      process_index=jax.process_index(),
      process_count=jax.process_count())
  eval_sets = _eval_sets(cfg, source)

  # ---- Program: model, optimizer, shardings, step ------------------------------------------
  program = program_lib.build(cfg, mesh, cfg.asr.units)

  # ---- Restore or initialise ---------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=tcfg.keep_checkpoints,
                                     async_save=tcfg.async_checkpoints)
  restored = ckpt.restore(program.abstract_state, data_iter)
  if restored is not None:
    start_step, state = restored
    log.info("resuming from checkpoint at step %d", start_step)
  else:
    start_step, state = 0, program.init()
    if tcfg.init_from:
      src = checkpoint_lib.Checkpointer(tcfg.init_from, keep=2, async_save=False)
      step = src.latest_step()
      if step is None:
        raise TrainingError(f"train.init_from={tcfg.init_from!r} holds no checkpoint")
      loaded = src.restore_state(step, program.abstract_state)
      state = dict(state, params=loaded["params"], vq=loaded["vq"])
  if is_main:
    print(_summary(cfg, program, data, shapes, workdir, start_step), flush=True)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step if start_step else None)

  # ---- Loop --------------------------------------------------------------------------------
  stop = _StopSignal(mesh)
  bar = tqdm(total=tcfg.steps, initial=start_step, disable=not is_main, unit="step",
             dynamic_ncols=True)
  pending: tuple[int, Any] | None = None
  last: dict[str, Any] = {}
  window = {"t": time.perf_counter(), "tokens": 0.0}
  last_good = start_step

  def finish(step_number: int, device_metrics: Any) -> None:
    """Fetches a step's metrics, stops on a non-finite loss, logs every log_every steps."""
    m = jax.device_get(device_metrics)
    if not math.isfinite(float(m["loss"])):
      raise TrainingError(
          f"loss is {float(m['loss'])} at step {step_number}; stopping. The last good "
          f"checkpoint (step {last_good}) is intact: lower train.learning_rate or check the "
          "data, then rerun the same command to resume from it")
    window["tokens"] += float(m["tokens"])
    if step_number % tcfg.log_every == 0 or step_number == tcfg.steps:
      rate = window["tokens"] / max(time.perf_counter() - window["t"], 1e-9)
      row = {k: m[k] for k in ("loss", "loss_ctc", "loss_commit", "grad_norm", "lr",
                               "code_usage", "code_perplexity", "codes_restarted")}
      row["tokens_per_s"] = rate
      writer.write(step_number, row)
      bar.set_postfix(loss=f"{float(m['loss']):.3f}", audio_x=f"{rate / 12.5:.1f}")
      window.update(t=time.perf_counter(), tokens=0.0)
      last.update(row, step=step_number)

  def run_eval(step_number: int) -> None:
    tok = SpeechTokenizer(cfg, units, jax.device_get(state["params"]),
                          jax.device_get(state["vq"]))
    row = {}
    for split, utts in eval_sets.items():
      result = evaluate(tok, source, utts)
      row[f"wer_{split}"] = result["wer"]
      row[f"code_usage_{split}"] = result["code_usage"]
    writer.write(step_number, row)
    tqdm.write(f"step {step_number}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    last.update(row)
    window.update(t=time.perf_counter(), tokens=0.0)  # eval time is not training throughput

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
      if step == start_step + 1:  # the first step compiles: restart the rate window
        finish(*pending)
        pending = None
        window.update(t=time.perf_counter(), tokens=0.0)
      bar.update(1)
      if (step % dcfg.eval_every == 0 or step == tcfg.steps) and eval_sets:
        if pending is not None:
          finish(*pending)
          pending = None
        run_eval(step)
      stopping = stop.agreed()  # once per step on every process
      if step % tcfg.checkpoint_every == 0 or step == tcfg.steps or stopping:
        if pending is not None:
          finish(*pending)
          pending = None
        save(step)
      if stopping:
        tqdm.write(f"{stop.received or 'a stop signal (on another process)'} received: saved "
                   f"a checkpoint at step {step}; rerun the same command to resume")
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
