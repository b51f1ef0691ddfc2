"""The t2t model's text units: the characters of the normalized transcript.

Why characters: the speech tokenizer's transcripts (its ASR target) are lower-case a-z,
apostrophes and single spaces, so 28 units cover every training text exactly; the model learns
spelling-to-sound itself, with no second model (a G2P, a SentencePiece vocabulary) to keep in
step, and any text normalizes into them. README ("Text-to-token") has the measurement.
"""

import dataclasses

from sptlm.speech.corpus import normalize_text

ALPHABET = " '" + "abcdefghijklmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A text as unit ids, with what normalization dropped (digits, punctuation, other scripts)."""

  text: str  # the normalized text the ids spell
  ids: list[int]
  dropped: int  # characters of the input that no unit spells (not counting case and spacing)


def size() -> int:
  return len(ALPHABET)


def encode(text: str) -> Encoded:
  """Normalizes `text` as the tokenizer's transcripts are, then spells it in units. Letters
  and digits that no unit spells (digits, other scripts) are dropped and counted; punctuation
  and case are not content and go silently."""
  norm = normalize_text(text)
  dropped = sum(1 for c in text if c.isalnum() and not (c.isascii() and c.isalpha()))
  return Encoded(norm, [ALPHABET.index(c) for c in norm], dropped)


def decode(ids: list[int]) -> str:
  return "".join(ALPHABET[i] for i in ids)
