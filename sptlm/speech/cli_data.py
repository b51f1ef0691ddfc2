"""The data-side `sptlm tokenizer` commands: build-corpus, fetch-lm-text, build-lm.

Handlers as in sptlm.speech.cli (which registers them): (args, overrides) -> exit code; a user
error is a UserError with one line.
"""

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

from sptlm import paths
from sptlm.errors import InputError, MissingFileError, UserError


def no_overrides(overrides: Sequence[str], command: str) -> None:
  """Only `tokenizer train` reads a config, so overrides anywhere else are a mistake."""
  if overrides:
    raise UserError(f"{overrides[0]}: --config.KEY=VALUE overrides apply to `tokenizer train`, "
                     f"not `tokenizer {command}`")


def cmd_build_corpus(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  no_overrides(overrides, "build-corpus")
  from sptlm.speech import corpus
  texts = [pathlib.Path(t) for t in args.text]
  engines = [e.strip() for e in args.engines.split(",") if e.strip()]
  if not engines:
    raise InputError("--engines is empty; name one or more of "
                     f"{','.join(corpus.ENGINES)}")
  if args.fortunes:
    if not corpus.FORTUNES_DIR.is_dir():
      raise MissingFileError(f"--fortunes: {corpus.FORTUNES_DIR} not found; "
                             "apt-get install fortunes")
    texts += sorted(p for p in corpus.FORTUNES_DIR.iterdir()
                    if p.is_file() and not p.suffix and p.name not in ("art", "ascii-art"))
  if texts and not args.no_default_text:
    texts = corpus.default_texts() + texts
  meta = corpus.build_corpus(args.out, texts=texts, seed=args.seed, num_train=args.train,
                             num_test=args.test, num_dev=args.dev,
                             heldout_variants=args.heldout_variants,
                             workers=args.workers, engines=engines,
                             heldout_engine=args.heldout_engine, reuse=args.reuse,
                             log=lambda line: print(line, file=sys.stderr))
  print(json.dumps({"out": str(args.out), "counts": meta["counts"],
                    "hours": meta.get("hours"), "heldout_voices": len(meta["heldout_voices"]),
                    "train_voices": len(meta["train_voices"]),
                    **{k: meta[k] for k in ("engines", "heldout_engine", "skipped_engines",
                                            "failed") if k in meta}}))
  return 0


def cmd_fetch_lm_text(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  no_overrides(overrides, "fetch-lm-text")
  from sptlm.speech import lm_text
  if args.source == "wordnet":
    out = lm_text.write_wordnet(args.out or "runs/lm_text/wordnet")
  else:
    out = lm_text.fetch_shakespeare(args.out or "runs/lm_text/shakespeare")
  files = sorted(out.glob("*.txt"))
  print(json.dumps({"out": str(out), "files": len(files),
                    "bytes": sum(f.stat().st_size for f in files)}))
  return 0


def cmd_build_lm(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  no_overrides(overrides, "build-lm")
  import dataclasses
  import shutil
  from sptlm.speech import config as config_lib
  from sptlm.speech import manifest
  wd = pathlib.Path(args.workdir)
  if not (wd / "config.json").is_file():
    raise MissingFileError(f"--workdir {wd}: no config.json; give a `tokenizer train` work "
                           "directory")
  if args.order < 1:
    raise InputError(f"--order must be >= 1, not {args.order}")
  cfg = config_lib.from_json((wd / "config.json").read_text())
  lm_text = tuple(args.lm_text) if args.lm_text is not None else cfg.asr.lm_text
  missing = [t for t in lm_text if not paths.resolve(t).exists()]
  if missing:
    raise MissingFileError(f"--lm-text {missing[0]} not found")
  source = manifest.ManifestSource(paths.resolve(args.corpus))
  from sptlm.speech import train as train_lib  # jax: after the cheap checks
  from sptlm.speech.tokenizer import LM_FILE
  cfg = dataclasses.replace(cfg, asr=dataclasses.replace(cfg.asr, lm_order=args.order,
                                                         lm_text=lm_text))
  lm = train_lib.train_language_model(cfg, source)
  kept = None
  if (wd / LM_FILE).exists():  # the LM it replaces stays beside it
    n = 1
    while (wd / f"asr_lm.previous{n}.arpa").exists():
      n += 1
    kept = wd / f"asr_lm.previous{n}.arpa"
    shutil.copyfile(wd / LM_FILE, kept)
  path = train_lib.save_language_model(lm, wd)
  print(json.dumps({"lm": str(path), "order": lm.order, "vocab": len(lm.vocab),
                    "ngrams": lm.num_ngrams(), "previous": str(kept) if kept else None}))
  print(f"next: sptlm tokenizer tune --workdir {wd} --corpus {args.corpus} (the LM weights in "
        "asr_decoding.json were chosen for the LM before)", file=sys.stderr)
  return 0
