"""`sptlm eval`: argument parsing only; the work is in sptlm.eval.runner."""

import argparse
from collections.abc import Sequence


def cmd_eval(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from sptlm.config import ConfigError
  from sptlm.eval import runner
  if overrides:
    raise ConfigError("sptlm eval takes no --config.KEY overrides")
  settings = [s.strip() for arg in (args.setting or []) for s in arg.split(",") if s.strip()]
  results = runner.evaluate(args.workdir, args.task, args.data, settings=settings,
                            limit=args.limit, out=args.out, t2t=args.t2t, reduce=args.nll,
                            seed=args.seed)
  for r in results:
    if r["task"] == "perplexity":
      print(f"perplexity   {r['setting']:<5} n={r['n']:<5} {r['perplexity']:.2f} "
            f"({r['tokens']:,} tokens, {r['nll_per_token']:.4f} nats each)", flush=True)
      continue
    lo, hi = r["ci95"]
    skipped = sum(r["skipped"].values())
    print(f"{r['task']:<12} {r['setting']:<5} n={r['n']:<5} accuracy {r['accuracy']:.3f} "
          f"[{lo:.3f}, {hi:.3f}]" + (f"  skipped {skipped}" if skipped else "")
          + (f"  contexts cut {r['cut']}" if r["cut"] else ""), flush=True)
  return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
      "eval", help="score a trained model on an evaluation task",
      description="Scores the newest checkpoint of --workdir on --task over --data: "
      "storycloze (both variants), sstorycloze (the story's own wrong ending) or tstorycloze "
      "(another story's ending), or held-out perplexity of documents, in each --setting "
      "(context->continuation modality; speech from the text-to-token model --t2t). A pair "
      "scores 1 when the right ending has the lower NLL, 0.5 on a tie. Writes results JSON (accuracy, n, 95%% Wilson interval) to "
      "--out (default DIR/eval/results_STEP.json), a per-example JSONL beside it, and "
      "TensorBoard scalars under DIR/tensorboard/eval.")
  p.add_argument("--workdir", required=True, help="a `sptlm train` work directory")
  p.add_argument("--task", required=True,
                 help="storycloze, sstorycloze, tstorycloze or perplexity")
  p.add_argument("--data", required=True,
                 help="StoryCloze CSV (contracts.md); for perplexity, documents (text or .jsonl)")
  p.add_argument("--setting", action="append",
                 help="S->S, S->T, T->S or T->T (perplexity: T or S); repeat or "
                 "comma-separate (default: all)")
  p.add_argument("--limit", type=int, default=None, help="score only the first N stories")
  p.add_argument("--out", default=None, help="results JSON path")
  p.add_argument("--t2t", default=None,
                 help="a `sptlm t2t train` work directory: speaks the text in S settings")
  p.add_argument("--nll", choices=("mean", "sum"), default="mean",
                 help="a continuation's NLL: mean per token (default) or summed")
  p.add_argument("--seed", type=int, default=0, help="tStoryCloze's ending draw (default 0)")
  p.set_defaults(func=cmd_eval)
