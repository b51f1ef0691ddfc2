"""ASR targets: SentencePiece units of normalized transcripts, CTC labels and greedy decoding.

Units are letters (SentencePiece `char` model: a-z, apostrophe, word boundary) or subwords (a
`unigram` model). CTC class 0 is the blank; class i + 1 is SentencePiece id i (id 0 is <unk>;
no bos/eos/pad), so a head with `asr.units + 1` outputs covers a model of up to asr.units.
"""

import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from sptlm.errors import InputError, MissingFileError


def train_units(transcripts: Sequence[str], units: int, out_model: pathlib.Path,
                unit_type: str = "unigram") -> pathlib.Path:
  """A SentencePiece model of the training transcripts (deterministic: one thread, all input);
  `char` models have as many units as there are letters, at most `units`."""
  out_model.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    text = pathlib.Path(tmp) / "transcripts.txt"
    text.write_text("".join(t + "\n" for t in transcripts if t))
    prefix = pathlib.Path(tmp) / "units"
    try:
      spm.SentencePieceTrainer.train(
          input=str(text), model_prefix=str(prefix), vocab_size=units, model_type=unit_type,
          character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
          num_threads=1, minloglevel=2, input_sentence_size=0,
          hard_vocab_limit=True)
    except RuntimeError as e:
      raise InputError(f"cannot train {units} ASR units on {len(transcripts)} transcripts "
                       f"({str(e).splitlines()[0][-120:]}); adjust asr.units") from None
    tmp_model = out_model.with_suffix(".model.part")
    tmp_model.write_bytes(prefix.with_suffix(".model").read_bytes())
    tmp_model.replace(out_model)
  return out_model


class Units:
  """Text <-> CTC label ids."""

  def __init__(self, model_file: str | pathlib.Path):
    path = pathlib.Path(model_file)
    if not path.is_file():
      raise MissingFileError(f"ASR unit model not found: {path}")
    self.sp = spm.SentencePieceProcessor(model_file=str(path))
    self.size = self.sp.vocab_size()

  def labels(self, text: str) -> np.ndarray:
    return np.asarray(self.sp.encode(text), np.int32) + 1

  def text(self, labels: Sequence[int]) -> str:
    ids = [int(i) - 1 for i in labels if i > 0]
    return self.sp.decode(ids)

  def greedy(self, best_N: np.ndarray) -> str:
    """Per-frame argmax classes -> text: merge repeats, drop blanks."""
    best = np.asarray(best_N)
    if best.size == 0:
      return ""
    keep = np.concatenate([[True], best[1:] != best[:-1]]) & (best != 0)
    return self.text(best[keep].tolist())


def ctc_frames_needed(labels: np.ndarray) -> int:
  """Frames CTC needs for these labels: one each, plus a blank between equal neighbours."""
  labels = np.asarray(labels)
  return int(len(labels) + np.sum(labels[1:] == labels[:-1]))
