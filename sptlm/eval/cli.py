"""`sptlm eval`: argument parsing only; the work is in sptlm.eval.runner."""

import argparse
from collections.abc import Sequence


def cmd_eval(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from sptlm.eval import runner
  settings = [s.strip() for arg in (args.setting or []) for s in arg.split(",") if s.strip()]
  results = runner.evaluate(args.workdir, args.task, args.data, settings=settings,
                            limit=args.limit, out=args.out, t2t=args.t2t, reduce=args.nll,
                            seed=args.seed, audio=args.audio,
                            speech_tokenizer=args.speech_tokenizer, overrides=overrides,
                            batch=args.batch, mesh=_mesh(args.workdir) if args.mesh else None)
  for r in results:
    if r["task"] == "perplexity":
      print(f"perplexity   {r['setting']:<5} n={r['n']:<5} {r['perplexity']:.2f} "
            f"({r['tokens']:,} tokens, {r['nll_per_token']:.4f} nats each)", flush=True)
      continue
    lo, hi = r["ci95"]
    if r["n"] == 0:
      print(f"{r['task']:<12} {r['setting']:<5} n=0 (skipped: {r['skipped']})", flush=True)
      continue
    skipped = sum(r["skipped"].values())
    print(f"{r['task']:<12} {r['setting']:<5} n={r['n']:<5} accuracy {r['accuracy']:.3f} "
          f"[{lo:.3f}, {hi:.3f}]" + (f"  skipped {skipped}" if skipped else "")
          + (f"  cut to length {r['cut']}" if r["cut"] else ""), flush=True)
  return 0


def _mesh(workdir: str):
  """The run's mesh (cfg.mesh) over this host's devices; with no free (-1) axis in the
  config, the data axis takes the devices left over."""
  from etils import epath

  from sptlm import config as config_lib
  from sptlm import sharding
  from sptlm.eval import hf_model
  wd = epath.Path(workdir)
  if hf_model.is_hf_folder(wd) or not (wd / "config.json").exists():
    return None  # the HF folder's own loader decides; a missing run fails with its own line
  cfg = config_lib.from_json((wd / "config.json").read_text())
  sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
  if -1 not in sizes.values():  # sized for the training pod: the data axis takes what is here
    sizes["data"] = -1
  return sharding.make_mesh(sizes)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
      "eval", help="score a trained model on an evaluation task",
      description="Scores the newest checkpoint of --workdir (or a Hugging Face folder made "
      "by `sptlm convert to-hf`) on --task over --data: storycloze (both variants), "
      "sstorycloze (the story's own wrong ending) or tstorycloze (another story's ending), "
      "spoken_qa (LLaMA Questions TSV or WebQuestions JSON; greedy answers, normalised "
      "match), or held-out perplexity of documents, in each --setting (context->continuation "
      "modality). Speech comes from audio through --speech-tokenizer when given (--audio "
      "manifest, or the TSV's Wav Filename column), else from the text-to-token model --t2t. "
      "A pair scores 1 when the right ending has the lower NLL, 0.5 on a tie. Writes results "
      "JSON (accuracy, n, 95%% Wilson interval) to --out (default DIR/eval/results_STEP.json), "
      "a per-example JSONL beside it, and TensorBoard scalars under DIR/tensorboard/eval. "
      "--config.eval.KEY=VALUE sets the prompt format and lengths (README: Evaluation).")
  p.add_argument("--workdir", required=True,
                 help="a `sptlm train` work directory or a `sptlm convert to-hf` folder")
  p.add_argument("--task", required=True,
                 help="storycloze, sstorycloze, tstorycloze, spoken_qa or perplexity")
  p.add_argument("--data", required=True,
                 help="StoryCloze CSV, LLaMA Questions TSV or WebQuestions JSON (contracts.md);"
                 " for perplexity, documents (text or .jsonl)")
  p.add_argument("--setting", action="append",
                 help="S->S, S->T, T->S or T->T (perplexity: T or S); repeat or "
                 "comma-separate (default: all; spoken_qa: S->T, S->S, T->T)")
  p.add_argument("--audio", default=None,
                 help="StoryCloze audio manifest: JSON lines {\"story\", \"part\", "
                 "\"audio\"} (README: Evaluation); tokenized by --speech-tokenizer")
  p.add_argument("--speech-tokenizer", default=None,
                 help="a `sptlm tokenizer train` work directory: tokenizes given audio and "
                 "transcribes S->S answers (default: eval.speech_tokenizer)")
  p.add_argument("--batch", type=int, default=None,
                 help="rows per scoring/generation call (default eval.batch, 16)")
  p.add_argument("--mesh", action="store_true",
                 help="shard over this host's devices with the run's mesh (cfg.mesh) instead "
                 "of one device")
  p.add_argument("--limit", type=int, default=None, help="score only the first N stories")
  p.add_argument("--out", default=None, help="results JSON path")
  p.add_argument("--t2t", default=None,
                 help="a `sptlm t2t train` work directory: speaks the text in S settings")
  p.add_argument("--nll", choices=("mean", "sum"), default="mean",
                 help="a continuation's NLL: mean per token (default) or summed")
  p.add_argument("--seed", type=int, default=0, help="tStoryCloze's ending draw (default 0)")
  p.set_defaults(func=cmd_eval)
