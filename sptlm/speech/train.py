"""`sptlm tokenizer train`: the speech tokenizer's training loop, top to bottom.

Mesh -> stop signal -> ASR units -> input -> program -> restore or init -> summary -> loop,
with the LM trainer's own pieces: its loop (sptlm.train.loop: resume, `Checkpointer` with the
corrupt-checkpoint fallback, `MetricsWriter` to DIR/metrics.jsonl + TensorBoard, SIGTERM
handling and the non-finite-loss stop), `optimizer.make` and the logical-axis mesh. A resumed
run sees exactly the batches, dead-code restarts (keyed by step) and losses of an
uninterrupted one.

metrics.jsonl rows: step, loss, loss_ctc, loss_commit, grad_norm, lr, code_usage,
code_perplexity, codes_restarted, tokens_per_s (12.5 Hz tokens of real audio per second),
and every data.eval_every steps wer_<split> for each of data.eval_splits.
"""

import math
import pathlib
import tempfile
from typing import Any

import jax
import numpy as np
from etils import epath

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
from sptlm.train import loop
from sptlm.train.loop import TrainingError
from sptlm.train.stop import StopSignal


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
  loop.write_config(workdir, config_lib.to_json(cfg))

  # ---- Mesh --------------------------------------------------------------------------------
  mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                             "tensor": cfg.mesh.tensor})
  stop = StopSignal(mesh)  # from here on, a preemption during start-up also ends in a checkpoint
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
  start_step, state = loop.restore_or_init(ckpt, program, data_iter, tcfg.init_from,
                                           ("params", "vq"))

  # ---- Summary -----------------------------------------------------------------------------
  if jax.process_index() == 0:
    print(_summary(cfg, program, data, shapes, workdir, start_step), flush=True)

  # ---- Loop --------------------------------------------------------------------------------
  def report(m: loop.Metrics, rate: float) -> tuple[dict[str, Any], dict[str, str]]:
    """rate: 12.5 Hz tokens of real audio per second; audio_x: seconds of audio per second."""
    row = {k: m[k] for k in ("loss", "loss_ctc", "loss_commit", "grad_norm", "lr",
                             "code_usage", "code_perplexity", "codes_restarted")}
    row["tokens_per_s"] = rate
    return row, {"loss": f"{float(m['loss']):.3f}", "audio_x": f"{rate / 12.5:.1f}"}

  def run_eval(step: int, state: loop.State) -> dict[str, float]:
    tok = SpeechTokenizer(cfg, units, jax.device_get(state["params"]),
                          jax.device_get(state["vq"]))
    row = {}
    for split, utts in eval_sets.items():
      result = evaluate(tok, source, utts)
      row[f"wer_{split}"] = result["wer"]
      row[f"code_usage_{split}"] = result["code_usage"]
    return row

  return loop.run(tcfg, workdir, config_lib.to_json(cfg), program=program, state=state,
                  start_step=start_step, data_iter=data_iter, ckpt=ckpt, stop=stop,
                  tokens=lambda m: float(m["tokens"]), report=report,
                  periodic=[loop.Periodic(dcfg.eval_every, run_eval)] if eval_sets else [])
