"""The t2t model's text units: characters of the normalized transcript, or SentencePiece pieces.

data.text_units = "characters" (the default) or "sentencepiece:N" (an N-piece unigram model
trained on the run's training transcripts, kept in the work directory as text_units.model).
Either way the text is first normalized as the speech tokenizer's transcripts are (lower-case
a-z, apostrophes, single spaces). README ("Text-to-token", text units) has the measurement
behind the default.
"""

import dataclasses
import io
from collections.abc import Sequence

import sentencepiece as spm
from etils import epath

from sptlm.errors import InputError
from sptlm.speech.corpus import normalize_text

ALPHABET = " '" + "abcdefghijklmnopqrstuvwxyz"
MODEL_FILE = "text_units.model"  # in the t2t work directory, for sentencepiece units


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A text as unit ids, with what normalization dropped (digits, punctuation, other scripts)."""

  text: str  # the normalized text the ids spell
  ids: list[int]
  dropped: int  # characters of the input that no unit spells (not counting case and spacing)


def _normalize(text: str) -> tuple[str, int]:
  """Letters and digits that no unit spells (digits, other scripts) are dropped and counted;
  punctuation and case are not content and go silently."""
  dropped = sum(1 for c in text if c.isalnum() and not (c.isascii() and c.isalpha()))
  return normalize_text(text), dropped


class Characters:
  """One unit per character of the normalized text: 28 units."""

  def size(self) -> int:
    return len(ALPHABET)

  def encode(self, text: str) -> Encoded:
    norm, dropped = _normalize(text)
    return Encoded(norm, [ALPHABET.index(c) for c in norm], dropped)

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(ALPHABET[i] for i in ids)


class Pieces:
  """SentencePiece pieces of the normalized text."""

  def __init__(self, model_proto: bytes):
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

  def size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str) -> Encoded:
    norm, dropped = _normalize(text)
    return Encoded(norm, list(self.sp.encode(norm)) if norm else [], dropped)

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode(list(ids))


Units = Characters | Pieces


def parse(spec: str) -> int:
  """The piece count of "sentencepiece:N"; 0 for "characters"; else a one-line error."""
  if spec == "characters":
    return 0
  kind, _, n = spec.partition(":")
  if kind != "sentencepiece" or not n.isdigit() or int(n) < 32:
    raise InputError(f"data.text_units={spec!r}: use 'characters' or 'sentencepiece:N' "
                     "(N >= 32 pieces, trained on the run's training transcripts)")
  return int(n)


def train(spec: str, texts: Sequence[str], workdir: str) -> Units:
  """The units of `spec`; sentencepiece ones are trained on `texts` once and kept in workdir
  (a resumed run reads them back, so its ids never change under it)."""
  n = parse(spec)
  if not n:
    return Characters()
  path = epath.Path(workdir) / MODEL_FILE
  if not path.exists():
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sorted({normalize_text(t) for t in texts} - {""})),
        model_writer=out, vocab_size=n, model_type="unigram", character_coverage=1.0,
        # no special pieces: ids 0..n-1 are all text; an unknown character is dropped upstream
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, num_threads=1, minloglevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (MODEL_FILE + ".tmp")
    tmp.write_bytes(out.getvalue())
    tmp.rename(path)
  return load(spec, workdir)


def load(spec: str, workdir: str) -> Units:
  """The units a trained run used."""
  if not parse(spec):
    return Characters()
  path = epath.Path(workdir) / MODEL_FILE
  if not path.exists():
    raise InputError(f"{path} is missing: the t2t run {workdir} was trained with "
                     f"data.text_units={spec!r} and keeps its SentencePiece model there")
  return Pieces(path.read_bytes())
