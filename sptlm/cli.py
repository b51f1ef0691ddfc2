"""`sptlm` command line: parses arguments and dispatches; the work lives in the packages.

A `UserError` (sptlm.errors: bad config, missing file, bad flags) is printed as one line and
exits 1; any other exception is a bug and keeps its traceback. `-v` shows tracebacks for all.
"""

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence

from sptlm import paths
from sptlm.errors import UserError

DEFAULT_CONFIG = "configs/tiny.py"


def _load_config(args: argparse.Namespace, overrides: Sequence[str]):
  """The frozen config; a bad file, key or value raises ConfigError before anything runs."""
  from sptlm import config as config_lib
  return config_lib.load(paths.resolve(args.config), list(overrides))


def cmd_train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  cfg = _load_config(args, overrides)
  from sptlm import distributed
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  from sptlm.train import trainer
  trainer.train(cfg, args.workdir or os.path.join("runs", cfg.name))
  return 0


def cmd_compile(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  cfg = _load_config(args, overrides)
  from sptlm import aot
  report = aot.compile_for_topology(cfg, args.topology, per_device_batch=args.per_device_batch)
  print(aot.format_report(report))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="sptlm", description="Pre-train interleaved speech-text language models in JAX.")
  parser.add_argument("-v", "--verbose", action="store_true",
                      help="debug logging, and full tracebacks for errors")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser("train", help="train a model from a config",
                     description="Trains; resumes by itself when --workdir holds a checkpoint. "
                     "Override any config key with --config.KEY=VALUE.")
  p.add_argument("--config", default=DEFAULT_CONFIG,
                 help=f"get_config() file (default: {DEFAULT_CONFIG}, the tiny CPU experiment)")
  p.add_argument("--workdir", help="run directory, local or gs:// (default: runs/<config name>)")
  g = p.add_argument_group("multi-process", "Cloud TPU pods and GKE are detected by themselves; "
                           "elsewhere name the coordinator (or set SPTLM_COORDINATOR, "
                           "SPTLM_NUM_PROCESSES, SPTLM_PROCESS_ID)")
  g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator service")
  g.add_argument("--num-processes", type=int, help="processes in the job")
  g.add_argument("--process-id", type=int, help="this process's index, 0-based")
  p.set_defaults(func=cmd_train)

  p = sub.add_parser("compile", help="compile the train step ahead of time for a TPU topology",
                     description="Compiles the train step for a TPU topology on any machine "
                     "(needs libtpu: pip install 'sptlm[tpu-aot]') and prints memory per device "
                     "and the step's analytic FLOPs.")
  p.add_argument("--config", required=True, help="get_config() file")
  p.add_argument("--topology", required=True, help="e.g. v5p-128, v5e-16, or v5p:4x4x4")
  p.add_argument("--per-device-batch", type=int, default=None,
                 help="sequences per device (default: data.global_batch_size / devices)")
  p.set_defaults(func=cmd_compile)

  from data_pipelines import cli as data_cli
  from sptlm.convert import cli as convert_cli
  from sptlm.eval import cli as eval_cli
  from sptlm.speech import cli as speech_cli
  from sptlm.t2t import cli as t2t_cli
  convert_cli.add_parser(sub)
  speech_cli.add_parser(sub)
  t2t_cli.add_parser(sub)
  data_cli.add_parser(sub)
  eval_cli.add_parser(sub)
  return parser


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """`--config.a.b=1` (or `--config.a.b 1`) are overrides; everything else goes to argparse."""
  rest, overrides = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--config."):
      if "=" not in arg:
        value = next(it, None)
        if value is None:
          raise UserError(f"{arg} needs a value: {arg}=VALUE")
        arg = f"{arg}={value}"
      overrides.append(arg)
    else:
      rest.append(arg)
  return rest, overrides


def _quiet_background_failures() -> None:
  """A failing background thread (Orbax's async save) re-raises in the main thread, which
  reports it; its own tracebacks (absl errors, asyncio's unretrieved futures, the thread's
  excepthook) become one warning line each. -v keeps them whole."""
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  logging.getLogger("absl").setLevel(logging.CRITICAL)

  def hook(a: threading.ExceptHookArgs) -> None:
    first = (str(a.exc_value).strip().splitlines() or [""])[0][:200]
    logging.getLogger("sptlm").warning("background thread %s failed: %s: %s",
                                       a.thread.name if a.thread else "?",
                                       a.exc_type.__name__, first)

  threading.excepthook = hook
  seen: set[str] = set()

  def unraisable(u: "sys.UnraisableHookArgs") -> None:  # e.g. tensorstore callbacks at exit
    text = f"{type(u.exc_value).__name__}: {u.exc_value}"
    if text not in seen:
      seen.add(text)
      logging.getLogger("sptlm").warning("ignored in a callback: %s", text[:200])

  sys.unraisablehook = unraisable


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  try:
    rest, overrides = _split_overrides(argv)
  except UserError as e:
    parser.exit(2, f"sptlm: error: {e}\n")
  args, unknown = parser.parse_known_args(rest)
  if unknown and hasattr(args, "beam_args"):  # `sptlm data materialize`: Beam's own options
    args.beam_args = [*args.beam_args, *unknown]
  elif unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                      format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if not args.verbose:
    _quiet_background_failures()
  handler: Callable[..., int] = args.func
  try:
    return handler(args, overrides)
  except UserError as e:
    if args.verbose:
      raise
    print(f"sptlm {args.command}: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:  # Ctrl-C: what the command finished is on disk, whole
    if args.verbose:
      raise
    print(f"sptlm {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
