"""`sptlm data inspect`: argument parsing only; the work is in data_pipelines.inspect."""

import argparse
import os
from collections.abc import Sequence

from sptlm import paths

DEFAULT_CONFIG = "configs/data_tiny.py"


def cmd_inspect(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter
  from data_pipelines import config as config_lib
  from data_pipelines import inspect as inspect_lib
  cfg = config_lib.load(paths.resolve(args.config), list(overrides))
  for line in inspect_lib.inspect(cfg, n=args.n, docs=args.docs):
    print(line, flush=True)
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
