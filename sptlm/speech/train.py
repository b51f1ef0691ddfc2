"""`sptlm tokenizer train`: the speech tokenizer's training loop, top to bottom.

Mesh -> stop signal -> ASR units -> input -> program -> restore or init -> summary -> loop,
with the LM trainer's own pieces: its loop (sptlm.train.loop: resume, `Checkpointer` with the
corrupt-checkpoint fallback, `MetricsWriter` to DIR/metrics.jsonl + TensorBoard, SIGTERM
handling and the non-finite-loss stop), `optimizer.make` and the logical-axis mesh. A resumed
run sees exactly the batches, dead-code restarts (keyed by step) and losses of an
uninterrupted one.

metrics.jsonl rows: step, loss, loss_ctc, loss_commit, loss_inter_ctc, (with the engine
adversary: loss_engine, engine_accuracy, loss_confusion), grad_norm, lr, code_usage,
code_perplexity, codes_restarted, tokens_per_s (12.5 Hz tokens of real audio per second),
and every data.eval_every steps, for each of data.eval_splits, wer_<split> (transcribe: beam
search with the run's word LM, WORKDIR/asr_lm.arpa), wer_greedy_<split> and code_usage_<split>.
At the last step the LM weights are chosen on data.tune_split (WORKDIR/asr_decoding.json).
"""

import dataclasses
import json
import logging
import math
import os
import pathlib
import tempfile
from typing import Any

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from sptlm import paths, sharding
from sptlm.paths import local_copy
from sptlm.speech import config as config_lib
from sptlm.speech import corpus as corpus_lib
from sptlm.speech import ctc_decode
from sptlm.speech import feature_cache
from sptlm.speech import input as input_lib
from sptlm.speech import lm_text as lm_text_lib
from sptlm.speech import manifest
from sptlm.speech import program as program_lib
from sptlm.speech import units as units_lib
from sptlm.speech import voice_change
from sptlm.speech import wer as wer_lib
from sptlm.speech.config import SpeechTokenizerConfig
from sptlm.speech.tokenizer import DECODING_FILE, LM_FILE, UNITS_FILE, SpeechTokenizer
from sptlm.train import checkpoint as checkpoint_lib
from sptlm.train import loop
from sptlm.train.loop import TrainingError
from sptlm.train.stop import StopSignal

log = logging.getLogger(__name__)


def _units(cfg: SpeechTokenizerConfig, source: manifest.ManifestSource,
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


def _feature_cache(cfg: SpeechTokenizerConfig, cache: epath.Path, data: input_lib.Prepared
                   ) -> feature_cache.FeatureCache | None:
  """data.cache_features: a slow front end's features kept under CACHE/features, when the
  cached features are the same every epoch (no augmentation, or data.augment.mel_only) and
  CACHE is a local directory."""
  d, m = cfg.data, cfg.model
  augmented = d.augment.enabled and not d.augment.mel_only
  if not d.cache_features or augmented or m.frontend not in feature_cache.CACHED:
    return None
  if "://" in str(cache):
    log.info("feature cache off: %s is not a local directory (set data.cache_dir to one)", cache)
    return None
  frontend, width = feature_cache.CACHED[m.frontend]
  feats = feature_cache.FeatureCache(pathlib.Path(str(cache)) / "features", frontend, width)
  log.info("feature cache: %s (up to %.1f GB for the %.2f h of %s)", feats.directory,
           data.hours * 3600 * feature_cache.bytes_per_second(width) / 1e9, data.hours,
           d.train_split)
  return feats


def _language_model(cfg: SpeechTokenizerConfig, source: manifest.ManifestSource,
                    wd: epath.Path) -> ctc_decode.NgramLM | None:
  """The transcription LM: WORKDIR/asr_lm.arpa, else trained once (`train_language_model`)."""
  if not cfg.asr.lm_order:
    return None
  path = wd / LM_FILE
  if path.exists():
    return ctc_decode.NgramLM.load_arpa(local_copy(path))
  lm = train_language_model(cfg, source)
  if jax.process_index() == 0:
    save_language_model(lm, wd)
  return lm


def train_language_model(cfg: SpeechTokenizerConfig,
                         source: manifest.ManifestSource) -> ctc_decode.NgramLM:
  """A word asr.lm_order-gram LM on the corpus's lm_text.txt (a built corpus: its sources'
  sentences outside the held-out splits, the training transcripts among them) or the training
  transcripts, plus asr.lm_text (files or directories, with whatever overlaps the held-out
  transcripts left out: sptlm.speech.lm_text)."""
  heldout = {u.text for split in source.splits() if split != cfg.data.train_split
             for u in source.utterances(split)}
  own = pathlib.Path(source.root) / corpus_lib.LM_TEXT if source.root else None
  if own is not None and own.is_file():
    texts = [corpus_lib.normalize_text(line) for line in
             own.read_text(encoding="utf-8", errors="replace").splitlines()]
  else:
    texts = [u.text for u in source.utterances(cfg.data.train_split)]
  texts = [t for t in texts if t and t not in heldout]
  extra = lm_text_lib.read([paths.resolve(t) for t in cfg.asr.lm_text], heldout)
  if cfg.asr.lm_text:
    log.info("asr.lm_text: %s", extra.summary())
  lm = ctc_decode.NgramLM.train(texts + extra.sentences, cfg.asr.lm_order)
  log.info("trained the transcription LM %s on %d corpus and %d extra sentences", lm,
           len(texts), len(extra.sentences))
  return lm


def save_language_model(lm: ctc_decode.NgramLM, workdir: str | pathlib.Path) -> pathlib.Path:
  """Writes WORKDIR/asr_lm.arpa whole: a killed write leaves the file it replaces in place."""
  path = epath.Path(workdir) / LM_FILE
  part = path.parent / (LM_FILE + ".part")
  tmp = pathlib.Path(tempfile.mkdtemp()) / LM_FILE
  lm.save_arpa(tmp)
  part.write_bytes(tmp.read_bytes())
  tmp.unlink()
  part.replace(path)
  return pathlib.Path(str(path))


def _eval_sets(cfg: SpeechTokenizerConfig,
               source: manifest.ManifestSource) -> dict[str, list[manifest.Utterance]]:
  out = {}
  for split in cfg.data.eval_splits:
    utts = source.utterances(split)
    n = cfg.data.eval_utterances
    out[split] = utts[:n] if n else utts
  return out


def evaluate(tok: SpeechTokenizer, source: manifest.ManifestSource,
             utts: list[manifest.Utterance]) -> dict[str, Any]:
  """WER of transcribe (the tokenizer's decoder) and of greedy CTC decoding, code usage and
  perplexity over `utts`; "log_probs" keeps the CTC posteriors for tuning."""
  audios = [source.load(u) for u in utts]
  codes = tok.encode(audios)
  log_probs = tok.log_probs(codes)
  refs = [u.text for u in utts]
  greedy = [tok.units.greedy(lp.argmax(-1)) for lp in log_probs]
  if tok.lm is not None and tok.beam > 1:
    hyps = ctc_decode.decode_batch(log_probs, tok.units, tok.lm, beam=tok.beam, alpha=tok.alpha,
                                   beta=tok.beta, lexicon=tok.lexicon)
  else:
    hyps = greedy
  counts = np.bincount(np.concatenate(codes), minlength=tok.codebook_size)
  p = counts / max(counts.sum(), 1)
  nz = p[p > 0]
  return {"wer": wer_lib.wer(refs, hyps), "wer_greedy": wer_lib.wer(refs, greedy),
          "code_usage": float(np.mean(counts > 0)),
          "code_perplexity": float(np.exp(-np.sum(nz * np.log(nz)))), "log_probs": log_probs,
          "hyps": hyps}


TUNE_ALPHAS = (0.3, 0.5, 0.7, 0.9, 1.2)
TUNE_BETAS = (0.0, 0.5, 1.0, 1.5, 2.5)


def tune_decoding(tok: SpeechTokenizer, refs: list[str], log_probs: list[np.ndarray],
                  beam: int = 16, finalists: int = 3) -> dict[str, float]:
  """The LM weight (alpha) and word bonus (beta) with the lowest WER on held-out audio.

  A grid at a narrow `beam` picks `finalists`; they and the current weights are decoded again
  at the tokenizer's own (wider) beam, which chooses: the ranking at beam 16 does not always
  hold at 64. Returns {alpha, beta, wer, beam, grid_beam}."""
  wide = max(tok.beam, beam)
  scored = []
  grid = [(a, b) for a in TUNE_ALPHAS for b in TUNE_BETAS]
  for a, b in tqdm(grid, desc=f"tune lm_alpha/lm_beta (beam {beam})", leave=False,
                   disable=jax.process_index() != 0):
    hyps = ctc_decode.decode_batch(log_probs, tok.units, tok.lm, beam=beam, alpha=a, beta=b,
                                   lexicon=tok.lexicon)
    scored.append((wer_lib.wer(refs, hyps), a, b))
  scored.sort(key=lambda x: x[0])  # stable: ties keep grid order
  if wide == beam:
    best = scored[0]
  else:
    candidates = list(dict.fromkeys([(a, b) for _, a, b in scored[:finalists]]
                                    + [(tok.alpha, tok.beta)]))
    best = None
    for a, b in tqdm(candidates, desc=f"tune: finalists at beam {wide}", leave=False,
                     disable=jax.process_index() != 0):
      hyps = ctc_decode.decode_batch(log_probs, tok.units, tok.lm, beam=wide, alpha=a, beta=b,
                                     lexicon=tok.lexicon)
      w = wer_lib.wer(refs, hyps)
      if best is None or w < best[0] - 1e-12:
        best = (w, a, b)
  return {"alpha": best[1], "beta": best[2], "wer": best[0], "beam": wide, "grid_beam": beam}


def tune(tok: SpeechTokenizer, source: manifest.ManifestSource, split: str,
         workdir: str | pathlib.Path) -> dict[str, Any]:
  """Chooses the decoding weights on `split` and writes them to WORKDIR/asr_decoding.json,
  where SpeechTokenizer.load finds them."""
  utts = source.utterances(split)  # an unknown or empty split: one InputError naming it
  result = evaluate(tok, source, utts)
  tuned = tune_decoding(tok, [u.text for u in utts], result["log_probs"])
  tuned["split"] = split
  if jax.process_index() == 0:  # whole or not at all: a killed tune keeps the old weights
    path = pathlib.Path(workdir) / DECODING_FILE
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(tuned, indent=2) + "\n")
    os.replace(part, path)
  return tuned


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
  loop.check_workdir(workdir)
  cfg = dataclasses.replace(cfg, train=loop.planned_steps(cfg.train, workdir))
  tcfg, dcfg = cfg.train, cfg.data
  wd = epath.Path(workdir)
  config_json = config_lib.to_json(cfg)

  # ---- Mesh --------------------------------------------------------------------------------
  mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                             "tensor": cfg.mesh.tensor})
  stop = StopSignal(mesh)  # from here on, a preemption during start-up also ends in a checkpoint
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]

  # ---- Input -------------------------------------------------------------------------------
  cache = epath.Path(dcfg.cache_dir) if dcfg.cache_dir else wd / "cache"
  splits = (dcfg.train_split, *dcfg.eval_splits, *([dcfg.tune_split] if dcfg.tune_split else []))
  source = manifest.open_source(dcfg.corpus, cache_dir=pathlib.Path(str(cache)),
                                  splits=tuple(dict.fromkeys(splits)))
  if jax.process_index() == 0:
    wd.mkdir(parents=True, exist_ok=True)  # the unit model and LM are kept beside the run
  units = _units(cfg, source, wd)
  shapes = input_lib.bucket_shapes(dcfg.bucket_seconds, dcfg.batch_seconds,
                                   math.lcm(data_parallel, jax.process_count()))
  data = input_lib.prepare(source, dcfg.train_split, units, max(n for _, n in shapes),
                           cfg.model.ctc_upsample)
  feats = _feature_cache(cfg, cache, data)
  data_iter = input_lib.train_iterator(
      source, data, shapes, steps=tcfg.steps, seed=tcfg.seed, num_mels=cfg.model.num_mels,
      ctc_upsample=cfg.model.ctc_upsample, short_first=dcfg.short_first,
      augment=dcfg.augment, process_index=jax.process_index(),
      process_count=jax.process_count(), frontend=cfg.model.frontend, cache=feats)
  eval_sets = _eval_sets(cfg, source)
  lm = _language_model(cfg, source, wd)
  tune_utts = []
  if dcfg.tune_split and lm:
    if dcfg.tune_split in source.splits():
      tune_utts = source.utterances(dcfg.tune_split)
    else:
      log.warning("data.tune_split=%r is not a split of %s: keeping asr.lm_alpha/lm_beta",
                  dcfg.tune_split, dcfg.corpus)

  # ---- Program: model, optimizer, shardings, step ------------------------------------------
  program = program_lib.build(cfg, mesh, cfg.asr.units)

  # ---- Restore or initialise ---------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=tcfg.keep_checkpoints,
                                     async_save=tcfg.async_checkpoints)
  start_step, state = loop.restore_or_init(ckpt, program, data_iter, tcfg.init_from,
                                           ("params", "vq"), config_json, tcfg.init_partial)
  loop.write_config(workdir, config_json, start_step)  # only now: the checkpoint fits
  if loop.already_complete(tcfg, start_step):
    ckpt.close()
    stop.restore()
    return {"step": start_step}

  # ---- Summary -----------------------------------------------------------------------------
  if jax.process_index() == 0:
    print(_summary(cfg, program, data, shapes, workdir, start_step), flush=True)

  # ---- Loop --------------------------------------------------------------------------------
  def report(m: loop.Metrics, rates: dict[str, float]) -> tuple[dict[str, Any], dict[str, str]]:
    """tokens_per_s: 12.5 Hz tokens of real audio per second (padding not counted); audio_x:
    seconds of audio per second."""
    rate = rates["tokens_per_s"]
    keys = ["loss", "loss_ctc", "loss_commit", "loss_inter_ctc", "grad_norm", "lr",
            "code_usage", "code_perplexity", "codes_restarted"]
    if cfg.asr.engine_adversary_weight > 0:
      keys += ["loss_engine", "engine_accuracy", "loss_confusion"]
    row = {k: m[k] for k in keys}
    row["tokens_per_s"] = rate
    if dcfg.augment.enabled and dcfg.augment.voice_prob:
      row["voice_kept"] = voice_change.kept_count()  # clips Praat could not give a new voice
    return row, {"loss": f"{float(m['loss']):.3f}", "audio_x": f"{rate / 12.5:.1f}"}

  def run_eval(step: int, state: loop.State) -> dict[str, float]:
    tok = SpeechTokenizer(cfg, units, jax.device_get(state["params"]),
                          jax.device_get(state["vq"]), lm=lm)
    row = {}
    if step == tcfg.steps and tune_utts:  # choose the decoding weights, then evaluate with them
      tuned = tune(tok, source, dcfg.tune_split, wd)
      tok.alpha, tok.beta = tuned["alpha"], tuned["beta"]
      row.update(lm_alpha=tuned["alpha"], lm_beta=tuned["beta"],
                 **{f"wer_tuned_{dcfg.tune_split}": tuned["wer"]})
    for split, utts in eval_sets.items():
      result = evaluate(tok, source, utts)
      row[f"wer_{split}"] = result["wer"]
      if lm is not None:
        row[f"wer_greedy_{split}"] = result["wer_greedy"]
      row[f"code_usage_{split}"] = result["code_usage"]
    return row

  periodic = [loop.Periodic(dcfg.eval_every, run_eval)] if eval_sets or tune_utts else []
  last = loop.run(tcfg, workdir, config_json, program=program, state=state,
                  start_step=start_step, data_iter=data_iter, ckpt=ckpt, stop=stop,
                  counts=lambda m: {"tokens_per_s": m["tokens"]}, report=report,
                  periodic=periodic)
  if feats is not None:
    log.info("feature cache: %d clips read back, %d featurized (%d of them over an unreadable "
             "file)", feats.hits, feats.misses, feats.recomputed)
  return last
