"""Trains the SentencePiece model that the tiny configs use for their text ids.

Run: python -m data_pipelines.train_sentencepiece [--corpus FILE] [--vocab-size N] [--out PREFIX]
"""

import argparse
import pathlib

import sentencepiece as spm

ASSETS = pathlib.Path(__file__).parent / "assets"


def train(corpus: pathlib.Path, vocab_size: int, out_prefix: pathlib.Path) -> pathlib.Path:
  """Trains a unigram model with fixed ids (pad 0, unk 1, bos 2, eos 3) so layouts stay stable."""
  spm.SentencePieceTrainer.train(
      input=str(corpus),
      model_prefix=str(out_prefix),
      vocab_size=vocab_size,
      model_type="unigram",
      character_coverage=1.0,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      byte_fallback=True,
      split_digits=True,
      num_threads=2,
      minloglevel=2,
  )
  return out_prefix.with_suffix(".model")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--corpus", type=pathlib.Path, default=ASSETS / "tinyshakespeare.txt")
  parser.add_argument("--vocab-size", type=int, default=1024)
  parser.add_argument("--out", type=pathlib.Path, default=ASSETS / "tiny_sp1024")
  args = parser.parse_args()
  print(train(args.corpus, args.vocab_size, args.out))


if __name__ == "__main__":
  main()
