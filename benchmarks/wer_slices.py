"""WER / CER of a tokenizer's transcripts sliced by text source and voice (issue 16).

Is a split's WER the sentences or the voices? Reads the per-utterance file of `sptlm tokenizer
evaluate --transcripts T` and the corpus it scored (its corpus.json names the text sources),
and prints one row per split, condition, engine and slice:

  sptlm tokenizer evaluate --workdir W --corpus C --splits test,test_voices \\
      --conditions clean --transcripts W/transcripts.jsonl
  python benchmarks/wer_slices.py --transcripts W/transcripts.jsonl --corpus C --by source
"""

import argparse
import json
import pathlib
import sys

from sptlm.errors import MissingFileError, UserError
from sptlm.speech import wer_slices


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--transcripts", required=True, help="an `evaluate --transcripts` file")
  p.add_argument("--corpus", required=True, help="the build-corpus directory it scored")
  p.add_argument("--by", default="source", help="source, voice or source,voice (default: source)")
  args = p.parse_args(argv)
  try:
    meta_path = pathlib.Path(args.corpus) / "corpus.json"
    if not meta_path.is_file():
      raise MissingFileError(f"not a build-corpus directory (no corpus.json): {args.corpus}")
    sources = json.loads(meta_path.read_text()).get("sources", [])
    by = [b for b in args.by.split(",") if b]
    rows = wer_slices.read_transcripts(args.transcripts)
    labels = wer_slices.source_labels(sources, log=lambda m: print(m, file=sys.stderr))
    print(wer_slices.table(wer_slices.slice_rows(rows, labels, by), by))
  except UserError as e:
    print(f"wer_slices: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
