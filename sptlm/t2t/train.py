"""`sptlm t2t train`: the text-to-token model's training, top to bottom.

Pairs (made once by the speech tokenizer, or given) -> mesh -> stop signal -> input ->
program (the LM's own: model, optimizer, shardings, step) -> restore or init -> loop (the
shared one: checkpoints, exact resume, metrics, progress bar). The run records which
tokenizer made its codes in WORKDIR/tokenizer.json; synthesis checks it.

metrics.jsonl rows: step, loss (per speech token and <|end_of_audio|>), loss_speech, grad_norm,
lr, tokens_per_s (real tokens: text, speech and the two markers), padded_tokens_per_s.
"""

import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
from etils import epath

from sptlm import paths, sharding
from sptlm.errors import InputError
from sptlm.t2t import config as config_lib
from sptlm.t2t import input as input_lib
from sptlm.t2t import pairs as pairs_lib
from sptlm.t2t import units as units_lib
from sptlm.t2t.config import T2TConfig
from sptlm.train import checkpoint as checkpoint_lib
from sptlm.train import loop
from sptlm.train import program as program_lib
from sptlm.train.stop import StopSignal

log = logging.getLogger(__name__)

PAIRS_DIR = "pairs"


def pair_files(cfg: T2TConfig, workdir: str, split: str) -> tuple[list[pathlib.Path],
                                                                   dict[str, Any]]:
  """The JSON-lines files of `split` and the identity of the tokenizer that made them; makes
  WORKDIR/pairs from data.corpus first when data.pairs is empty (process 0; finished shards
  are kept across restarts)."""
  d = cfg.data
  if d.pairs:
    specs = [str(paths.resolve(p)) for p in d.pairs]
    ident = None
    for spec in specs:
      rec = pathlib.Path(spec) / pairs_lib.TOKENIZER_FILE
      if rec.is_file():
        ident = json.loads(rec.read_text())
    if ident is None:
      ident = {"path": d.tokenizer, "fingerprint": "", "codebook_size": cfg.vocab.speech_size}
      if d.tokenizer:
        from sptlm.speech.tokenizer import SpeechTokenizer
        ident = pairs_lib.identity(d.tokenizer,
                                   SpeechTokenizer.load(str(paths.resolve(d.tokenizer)), lm=None))
    return pairs_lib.files(specs, split), ident
  out = epath.Path(workdir) / PAIRS_DIR
  splits = tuple(dict.fromkeys(s for s in (d.train_split, d.eval_split) if s))
  if jax.process_index() == 0:
    ident = pairs_lib.make(str(paths.resolve(d.tokenizer)), d.corpus, out, splits,
                           cache_dir=pathlib.Path(str(epath.Path(workdir) / "cache")))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("t2t pairs")
  ident = json.loads((out / pairs_lib.TOKENIZER_FILE).read_text())
  return pairs_lib.files([str(out)], split), ident


def sequences(cfg: T2TConfig, pairs: pairs_lib.Pairs, vocab,
              units: units_lib.Units) -> tuple[list, list, dict]:
  """Training sequences and their text lengths; pairs over the length limits are counted."""
  seqs, text_lengths = [], []
  skipped = {"text too long": 0, "speech too long": 0, "no text units": 0}
  for text, codes in zip(pairs.texts, pairs.tokens):
    enc = units.encode(text)
    if not enc.ids:
      skipped["no text units"] += 1
    elif len(enc.ids) > cfg.data.max_text_units:
      skipped["text too long"] += 1
    elif len(codes) > cfg.data.max_speech_tokens:
      skipped["speech too long"] += 1
    else:
      seqs.append(input_lib.example(enc.ids, codes, vocab))
      text_lengths.append(len(enc.ids))
  return seqs, text_lengths, skipped


def train(cfg: T2TConfig, workdir: str) -> dict[str, Any]:
  """Trains until train.steps (or a stop signal); returns the last logged metrics."""
  loop.check_workdir(workdir)
  cfg = dataclasses.replace(cfg, train=loop.planned_steps(cfg.train, workdir))
  tcfg, dcfg = cfg.train, cfg.data
  units_lib.parse(cfg.data.text_units)
  n_units = units_lib.parse(cfg.data.text_units) or units_lib.Characters().size()
  if cfg.vocab.text_size != n_units:
    raise config_lib.ConfigError(f"vocab.text_size={cfg.vocab.text_size}: the t2t text units "
                                 f"({cfg.data.text_units}) number {n_units}; set it to that")
  config_json = config_lib.to_json(cfg)

  # ---- Pairs -------------------------------------------------------------------------------
  files, ident = pair_files(cfg, workdir, dcfg.train_split)
  if ident["codebook_size"] != cfg.vocab.speech_size:
    raise config_lib.ConfigError(
        f"vocab.speech_size={cfg.vocab.speech_size} but the speech tokenizer "
        f"{ident['path']} has {ident['codebook_size']} codes; set it to that")
  pairs = pairs_lib.read(files, cfg.vocab.speech_size)
  if not pairs.texts:
    raise InputError(f"no usable pairs in {', '.join(map(str, files)) or dcfg.pairs}: "
                     f"{pairs.summary()}")

  # ---- Mesh --------------------------------------------------------------------------------
  mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                             "tensor": cfg.mesh.tensor})
  stop = StopSignal(mesh)

  # ---- Input -------------------------------------------------------------------------------
  vocab = program_lib.vocabulary(cfg)
  if jax.process_index() == 0:
    units_lib.train(cfg.data.text_units, pairs.texts, workdir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("t2t text units")
  units = units_lib.load(cfg.data.text_units, workdir)
  seqs, text_lengths, skipped = sequences(cfg, pairs, vocab, units)
  data_iter = input_lib.PackedPairs(seqs, text_lengths, seq_len=dcfg.seq_len,
                                    global_batch=dcfg.global_batch_size, seed=tcfg.seed,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())

  # ---- Program: model, optimizer, shardings, step ------------------------------------------
  program = program_lib.build(cfg, mesh)

  # ---- Restore or initialise ---------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=tcfg.keep_checkpoints,
                                     async_save=tcfg.async_checkpoints)
  start_step, state = loop.restore_or_init(ckpt, program, data_iter, tcfg.init_from,
                                           ("params",), config_json, tcfg.init_partial)
  loop.write_config(workdir, config_json, start_step)
  if jax.process_index() == 0:
    (epath.Path(workdir) / pairs_lib.TOKENIZER_FILE).write_text(json.dumps(ident, indent=2))
  if loop.already_complete(tcfg, start_step):
    ckpt.close()
    stop.restore()
    return {"step": start_step}

  # ---- Summary -----------------------------------------------------------------------------
  speech = sum(len(s) - t - 2 for s, t in zip(seqs, text_lengths))
  if jax.process_index() == 0:
    dropped = ", ".join(f"{n} {why}" for why, n in skipped.items() if n) or "none"
    print("\n".join([
        f"sptlm t2t train: {cfg.name}",
        f"  parameters      {program.num_params:,}",
        f"  pairs           {pairs.summary()}; {len(seqs):,} used ({dropped} left out), "
        f"{speech:,} speech tokens ({speech / 12.5 / 3600:.2f} h)",
        f"  tokenizer       {ident['path']} (codebook {ident['fingerprint'] or 'unknown'}, "
        f"{ident['codebook_size']} codes)",
        f"  batch           {dcfg.global_batch_size} x {dcfg.seq_len} tokens per step",
        f"  steps           {start_step} -> {tcfg.steps}",
        f"  checkpoints     {epath.Path(workdir) / 'checkpoints'}",
    ]), flush=True)

  # ---- Loop --------------------------------------------------------------------------------
  padded = dcfg.global_batch_size * dcfg.seq_len

  def report(m: loop.Metrics, rates: dict[str, float]) -> tuple[dict[str, Any], dict[str, str]]:
    row = {"loss": m["loss"], "loss_speech": m["loss_speech"], "grad_norm": m["grad_norm"],
           "lr": m["lr"], "tokens_per_s": rates["tokens_per_s"],
           "padded_tokens_per_s": rates["padded_tokens_per_s"]}
    return row, {"loss": f"{float(m['loss']):.3f}", "tok_s": f"{rates['tokens_per_s']:,.0f}"}

  return loop.run(tcfg, workdir, config_json, program=program, state=state,
                  start_step=start_step, data_iter=data_iter, ckpt=ckpt, stop=stop,
                  counts=lambda m: {"tokens_per_s": m["tokens"], "padded_tokens_per_s": padded},
                  report=report)
