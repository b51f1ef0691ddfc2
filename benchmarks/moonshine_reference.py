"""What Moonshine tiny itself transcribes, per engine of a corpus: the frozen encoder's reference.

model.frontend="moonshine_tiny" trains the tokenizer's layers, quantizer and CTC head on the
output of Moonshine tiny's encoder. This runs the whole Moonshine tiny model instead (the same
encoder plus its own autoregressive decoder, through the moonshine-voice package's runtime,
with no language model and no training on the corpus) on the corpus's test splits, and
reports WER and CER per engine. Where it is poor (formant and diphone synthesizers), the
encoder output carries the words less well, and a tokenizer trained on it has to learn them
back; where it is good, it shows what the encoder's output holds. The transcripts are
normalized as the corpus's are (lower case, no punctuation; digits, which the corpus's
sentences never have, are dropped).

  python benchmarks/moonshine_reference.py --corpus runs/speech_corpus_engines \\
      --splits test,test_engine --limit 300
  python benchmarks/moonshine_reference.py --corpus runs/speech_corpus_kokoro --splits test \\
      --engines kokoro
"""

import argparse
import collections
import importlib.util
import json
import pathlib
import sys
import time

from sptlm.errors import UserError
from sptlm.speech import corpus as corpus_lib
from sptlm.speech import manifest as manifest_lib
from sptlm.speech import wer as wer_lib


def transcriber():
  """Moonshine tiny from the files inside the moonshine-voice wheel (nothing is downloaded)."""
  spec = importlib.util.find_spec("moonshine_voice")
  if spec is None or not spec.submodule_search_locations:
    sys.exit("moonshine-voice is not installed: pip install -e '.[moonshine]'")
  from moonshine_voice.moonshine_api import ModelArch
  from moonshine_voice.transcriber import Transcriber
  model = pathlib.Path(spec.submodule_search_locations[0]) / "assets" / "tiny-en"
  return Transcriber(str(model), ModelArch.TINY)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--corpus", required=True)
  p.add_argument("--splits", default="test,test_engine")
  p.add_argument("--engines", default="", help="only these engines (comma-separated)")
  p.add_argument("--limit", type=int, default=300, help="utterances per engine")
  p.add_argument("--out", default="", help="also write the figures as JSON here")
  args = p.parse_args()
  source = manifest_lib.ManifestSource(pathlib.Path(args.corpus))
  by_engine: dict[str, list] = collections.defaultdict(list)
  for split in args.splits.split(","):
    if split in source.splits():
      for u in source.utterances(split):
        keep = not args.engines or u.engine in args.engines.split(",")
        if keep and len(by_engine[u.engine]) < args.limit:
          by_engine[u.engine].append(u)
  model = transcriber()
  rows = []
  print("| engine | utterances | WER | CER | x real time |")
  print("|---|---|---|---|---|")
  for engine, utts in sorted(by_engine.items()):
    refs, hyps, seconds, start = [], [], 0.0, time.time()
    for u in utts:
      x = source.load(u)
      seconds += len(x) / 16000
      out = model.transcribe_without_streaming(x.tolist())
      hyps.append(corpus_lib.normalize_text(" ".join(line.text for line in out.lines)))
      refs.append(u.text)
    row = dict(engine=engine or "(none)", utterances=len(utts), wer=wer_lib.wer(refs, hyps),
               cer=wer_lib.cer(refs, hyps), realtime=seconds / (time.time() - start))
    rows.append(row)
    print(f"| {row['engine']} | {row['utterances']} | {row['wer']:.1%} | {row['cer']:.1%} "
          f"| {row['realtime']:.0f} |", flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(dict(corpus=args.corpus, rows=rows), indent=1))


if __name__ == "__main__":
  try:
    main()
  except UserError as e:  # a missing corpus or unit model, a bad config: one line
    sys.exit(f"{pathlib.Path(__file__).name}: error: {e}")
