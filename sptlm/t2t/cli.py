"""`sptlm t2t train | synthesize`: argument parsing only; the work is in the modules.

`synthesize` writes one JSON line {"text", "tokens"} per input line, flushed as each batch is
done, and a summary line on stderr that counts every input it could not speak (empty lines,
lines that are not UTF-8, characters without a unit, long texts split).
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence

from sptlm import paths
from sptlm.errors import MissingFileError, UserError

DEFAULT_CONFIG = "configs/t2t_tiny.py"


def cmd_train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from sptlm.t2t import config as config_lib
  cfg = config_lib.load(paths.resolve(args.config), list(overrides))
  from sptlm.t2t import train
  train.train(cfg, args.workdir or os.path.join("runs", cfg.name))
  return 0


def _lines(args: argparse.Namespace) -> tuple[list[str], int]:
  """The texts to speak, and how many lines of --file were not UTF-8 (skipped)."""
  if (args.text is None) == (args.file is None):
    raise UserError("give either --text \"...\" or --file TXT")
  if args.text is not None:
    return [args.text], 0
  try:
    raw = open(args.file, "rb").read() if args.file != "-" else sys.stdin.buffer.read()
  except FileNotFoundError:
    raise MissingFileError(f"--file {args.file}: no such file") from None
  texts, bad = [], 0
  for line in raw.splitlines():
    try:
      texts.append(line.decode("utf-8"))
    except UnicodeDecodeError:
      bad += 1
  return texts, bad


def cmd_synthesize(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  if overrides:
    raise UserError(f"{overrides[0]}: overrides apply to `t2t train`; synthesize reads the "
                    "run's config.json (use --temperature, --top-p, --batch-size)")
  texts, not_utf8 = _lines(args)
  from sptlm.t2t.synthesize import T2T, Summary
  t2t = T2T.load(args.workdir, tokenizer=args.tokenizer)
  total = Summary()
  step = max(args.batch_size or t2t.cfg.synth.batch_size, 1) * 8
  for start in range(0, len(texts), step):  # print as we go: a long file shows progress
    chunk = texts[start:start + step]
    codes = t2t.synthesize(chunk, seed=args.seed, temperature=args.temperature,
                           top_p=args.top_p, batch_size=args.batch_size)
    for text, c in zip(chunk, codes):
      print(json.dumps({"text": text, "tokens": c.tolist()}), flush=True)
    total.texts += t2t.summary.texts
    total.pieces += t2t.summary.pieces
    total.tokens += t2t.summary.tokens
    total.counts.update(t2t.summary.counts)
  if not_utf8:
    total.counts["lines not UTF-8 (skipped)"] += not_utf8
  print(f"sptlm t2t synthesize: {total.line()}", file=sys.stderr)
  return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
      "t2t", help="the text-to-token model: text -> 12.5 Hz speech tokens",
      description="Train the text-to-token model on TTS pairs made by the speech tokenizer, "
      "and synthesize speech tokens from text.")
  sub = p.add_subparsers(dest="t2t_command", required=True, metavar="COMMAND")

  q = sub.add_parser("train", help="train a t2t model from a config",
                     description="Makes the TTS pairs once (data.tokenizer over data.corpus, "
                     "into WORKDIR/pairs) unless data.pairs names pre-tokenized JSON lines, "
                     "then trains; resumes by itself. Override keys with --config.KEY=VALUE.")
  q.add_argument("--config", default=DEFAULT_CONFIG,
                 help=f"get_config() file (default: {DEFAULT_CONFIG})")
  q.add_argument("--workdir", help="run directory (default: runs/<config name>)")
  q.set_defaults(func=cmd_train)

  q = sub.add_parser("synthesize", help="text -> speech tokens, JSON lines on stdout",
                     description="Prints {\"text\", \"tokens\"} per input (raw codebook "
                     "indices 0..K-1) and a summary line on stderr.")
  q.add_argument("--workdir", required=True, help="a `sptlm t2t train` run directory")
  q.add_argument("--text", help="one text to speak")
  q.add_argument("--file", help="a text file, one text per line (- for stdin)")
  q.add_argument("--tokenizer", help="the speech tokenizer work directory the codes are for: "
                 "refused unless it is the one the model was trained with")
  q.add_argument("--seed", type=int, default=0)
  q.add_argument("--temperature", type=float, help="0: greedy (default: synth.temperature)")
  q.add_argument("--top-p", type=float, help="nucleus mass (default: synth.top_p)")
  q.add_argument("--batch-size", type=int, help="rows per decode call (default: synth.batch_size)")
  q.set_defaults(func=cmd_synthesize)
