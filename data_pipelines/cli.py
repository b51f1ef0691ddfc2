"""`sptlm data inspect | materialize`: argument parsing only; the work is in data_pipelines."""

import argparse
import logging
import os
from collections.abc import Sequence

from sptlm import paths

DEFAULT_CONFIG = "configs/data_tiny.py"


def _environment() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter
  # gs:// through gcsfs (etils would pick tf.io.gfile once TensorFlow is importable): one
  # client for every path, and it honours STORAGE_EMULATOR_HOST
  os.environ.setdefault("EPATH_USE_TF", "false")


def cmd_inspect(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  _environment()
  from data_pipelines import config as config_lib
  from data_pipelines import inspect as inspect_lib
  cfg = config_lib.load(paths.resolve(args.config), list(overrides))
  for line in inspect_lib.inspect(cfg, n=args.n, docs=args.docs):
    print(line, flush=True)
  return 0


def cmd_materialize(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  _environment()
  if not args.verbose:
    for name in ("apache_beam", "root", "absl", "sptlm.t2t.synthesize"):
      logging.getLogger(name).setLevel(logging.WARNING)
  from data_pipelines import config as config_lib
  logging.disable(logging.WARNING)  # Beam's import warns about optional GCP clients
  try:
    from data_pipelines import materialize as materialize_lib
  finally:
    logging.disable(logging.NOTSET)
  from sptlm.config import ConfigError
  if args.num_workers < 1:
    raise ConfigError(f"--num-workers={args.num_workers} must be at least 1")
  cfg = config_lib.load(paths.resolve(args.config), list(overrides))
  stats = materialize_lib.materialize(cfg, args.output, num_workers=args.num_workers,
                                      beam_args=args.beam_args)
  for name, t in stats["tasks"].items():
    skipped = sum(t["skipped"].values())
    print(f"  {name:<14} {t['kind']:<12} {t['examples']:>9,} examples {t['tokens']:>12,} "
          f"tokens  speech {t['speech tokens'] / max(t['tokens'], 1):6.1%}  "
          f"skipped {skipped:,}", flush=True)
  print(f"statistics: {args.output}/stats.json", flush=True)
  return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
      "data", help="the data pipeline: interleaved speech-text tasks and mixtures",
      description="Inspect a data config's tasks (seqio tasks over text corpora, interleaved "
      "with speech spans by the text-to-token model).")
  sub = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
  q = sub.add_parser("inspect", help="print examples in readable form and task statistics",
                     description="Prints each task's first N examples (speech spans as "
                     "[audio: N tokens \"source text\"]) and statistics over its first "
                     "--docs documents: tokens, speech share, span lengths against lambda, "
                     "spoken fraction against eta. Override keys with --config.KEY=VALUE.")
  q.add_argument("--config", default=DEFAULT_CONFIG,
                 help=f"a data get_config() file (default: {DEFAULT_CONFIG})")
  q.add_argument("--n", type=int, default=3, help="examples shown per task (default 3)")
  q.add_argument("--docs", type=int, default=200,
                 help="documents per task the statistics cover (default 200)")
  q.set_defaults(func=cmd_inspect)
  m = sub.add_parser(
      "materialize", help="run the tasks' preprocessing (synthesis included) into ArrayRecord "
      "shards with Apache Beam",
      description="Runs every task of a data config (tokenization; for interleaved tasks the "
      "text-to-token model) as an Apache Beam pipeline and writes ArrayRecord shards and "
      "stats.json under --output. Identical shards for any --num-workers; a re-run skips "
      "finished shards. Other options are Apache Beam's, e.g. "
      "`--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp`.")
  m.add_argument("--config", default=DEFAULT_CONFIG,
                 help=f"a data get_config() file (default: {DEFAULT_CONFIG})")
  m.add_argument("--output", required=True, help="output directory (local or gs://)")
  m.add_argument("--num-workers", type=int, default=1,
                 help="DirectRunner worker processes (default 1)")
  m.add_argument("beam_args", nargs="*", metavar="BEAM_OPTION",
                 help="Apache Beam pipeline options (--runner=..., --project=...)")
  m.set_defaults(func=cmd_materialize)
