"""`sptlm convert to-hf | from-hf | verify`: argument parsing only; the work is in the modules.

Wire it into sptlm/cli.py's build_parser with `convert_cli.add_parser(sub)`. Errors are
ConversionError or ConfigError (both UserError), which `sptlm` prints as one line.
"""

import argparse
import contextlib
from collections.abc import Iterator, Sequence

from sptlm.convert import ConversionError


@contextlib.contextmanager
def _needs_extra() -> Iterator[None]:
  """A missing optional dependency becomes one line saying what to install."""
  try:
    yield
  except ImportError as e:
    if e.name and e.name.split(".")[0] in ("transformers", "safetensors", "tokenizers", "torch"):
      raise ConversionError(f"sptlm convert needs {e.name.split('.')[0]}: pip install "
                            "'sptlm[convert]' (and torch==2.13.0 for verify)") from None
    raise


def _no_overrides(command: str, overrides: Sequence[str]) -> None:
  if overrides:
    raise ConversionError(f"convert {command} reads the run's own config.json; "
                          f"{overrides[0]} has nothing to override")


def cmd_to_hf(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  _no_overrides("to-hf", overrides)
  with _needs_extra():
    from sptlm.convert import safetensors_io, to_hf
    report = to_hf.export(args.workdir, args.out, dtype=args.dtype, step=args.step,
                          max_shard_bytes=safetensors_io.parse_size(args.max_shard_size),
                          overwrite=args.overwrite)
  print(report.summary())
  return 0


def cmd_from_hf(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from sptlm import config as config_lib
  from sptlm import paths
  cfg = config_lib.load(paths.resolve(args.config), list(overrides))
  with _needs_extra():
    from sptlm.convert import from_hf
    derivation = from_hf.derive(args.hf, cfg, from_hf.pinned(overrides))
    print(derivation.summary(), flush=True)  # before the copy, which takes minutes at 9B
    report = from_hf.import_(derivation, args.out)
  print(report.summary())
  return 0


def cmd_verify(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  _no_overrides("verify", overrides)
  with _needs_extra():
    from sptlm.convert import verify
    rows = verify.compare(args.workdir, args.hf, step=args.step)
  print(verify.format_rows(rows))
  if args.atol is not None:
    worst = max(r.max_abs_diff for r in rows)
    if worst > args.atol:
      print(f"max |dlogit| {worst:.3e} exceeds --atol {args.atol:g}")
      return 1
  return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
  """Registers `convert` and its sub-commands on sptlm's top-level sub-parsers."""
  p = subparsers.add_parser(
      "convert", help="convert checkpoints to and from Hugging Face transformers",
      description="Checkpoint conversion to and from PyTorch (Hugging Face transformers: "
      "Llama, Qwen2 and GLM families), exact in both directions and verified by logits. "
      "Needs pip install 'sptlm[convert]'; verify also needs torch.")
  sub = p.add_subparsers(dest="convert_command", required=True, metavar="COMMAND")

  q = sub.add_parser(
      "to-hf", help="workdir checkpoint -> Hugging Face folder",
      description="Writes a folder that AutoModelForCausalLM and AutoTokenizer load without "
      "custom code: config.json, safetensors weights (sharded, streamed one tensor at a time) "
      "and tokenizer files with the speech and special tokens as added tokens.")
  q.add_argument("--workdir", required=True, help="run directory (local or gs://)")
  q.add_argument("--out", required=True, help="Hugging Face folder to write (local)")
  q.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="weight dtype in the safetensors files (default: float32)")
  q.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
  q.add_argument("--max-shard-size", default="5GB",
                 help="largest safetensors file, e.g. 5GB or 500MB (default: 5GB)")
  q.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
  q.set_defaults(func=cmd_to_hf)

  q = sub.add_parser(
      "from-hf", help="Hugging Face text LM -> sptlm initial checkpoint",
      description="Imports a Llama, Qwen2 or GLM (model_type 'glm', or the original ChatGLM "
      "layout of THUDM/glm-4-9b and glm-4-voice-9b) LM as a step-0 checkpoint for "
      "--config.train.init_from=OUT, the vocabulary extended with speech and special tokens "
      "(new rows: the text rows' mean plus N(0, 1e-9 * covariance)); a model whose tokenizer "
      "already has <|audio_0|>.. keeps its own ids and rows for them. The "
      "model section and vocab.text_size come from the Hugging Face config (each printed, "
      "with the --config value it replaces); --config gives the rest. OUT/config.py is that "
      "run, ready for sptlm train --config OUT/config.py.")
  q.add_argument("--hf", required=True, help="Hugging Face model folder (safetensors)")
  q.add_argument("--config", required=True,
                 help="get_config() file of the run to start (all but the model's shape)")
  q.add_argument("--out", required=True, help="directory to write (local or gs://)")
  q.set_defaults(func=cmd_from_hf)

  q = sub.add_parser(
      "verify", help="compare logits of a workdir and a Hugging Face folder",
      description="Runs both models in float32 on the same text, speech and mixed inputs and "
      "prints the max absolute logit difference, the mean per-token KL and top-1 agreement.")
  q.add_argument("--workdir", required=True, help="run directory (local or gs://)")
  q.add_argument("--hf", required=True, help="Hugging Face folder")
  q.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
  q.add_argument("--atol", type=float,
                 help="exit with status 1 when the max |dlogit| exceeds this")
  q.set_defaults(func=cmd_verify)
