"""The token id layout shared by the model, the data tasks and the converters.

Text ids come first (a SentencePiece or Hugging Face text vocabulary), then one id per speech
codebook entry `<|audio_0|>` ... `<|audio_{K-1}|>`, then the special tokens, and the total is
padded to a multiple of 128 so the embedding shards evenly. Speech tokens are stored on disk as
raw codebook indices (0..K-1); `speech_id` adds the offset only when examples are built, so a
new layout never needs re-extraction.

A layout can instead adopt a base model's ids (`Vocabulary.of(..., speech_offset=...,
special_ids=...)`, or `adopt` from its tokenizer's token ids): GLM-4-Voice-9B's tokenizer holds
`<|audio_0|>`..`<|audio_16383|>` after its text and special tokens, and its own
`<|begin_of_audio|>`, `<|user|>`, ... Then text_size counts all of the base model's rows, the
speech tokens and the adopted specials sit at the base's ids inside them, and the specials the
base lacks (`specials`) form a block of their own: in the base's unused padding rows when they
fit (`special_offset`), else after its rows. The defaults are the layout above.
"""

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|pad|>",
)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Answers which ids are text, which are speech and which are special."""

  text_size: int
  speech_size: int
  pad_multiple: int = 128
  specials: tuple[str, ...] = SPECIAL_TOKENS  # the specials of the block at special_start
  # An adopted layout (module docstring); -1 and () keep sptlm's own.
  speech_offset: int = -1  # the id of <|audio_0|>; -1: right after the text ids
  special_offset: int = -1  # the id of specials[0]; -1: after the text and speech ids
  adopted: tuple[tuple[str, int], ...] = ()  # (special token, its id in the base model)

  def __post_init__(self) -> None:
    if self.text_size <= 0 or self.speech_size < 0:
      raise ValueError(f"vocabulary: text_size={self.text_size} and speech_size="
                       f"{self.speech_size} must be positive")
    if self.is_adopted:
      self._check_adopted()

  @classmethod
  def from_config(cls, v: object) -> "Vocabulary":
    """The layout a config's vocab section describes (sptlm's VocabConfig, or a data config's
    vocab section, which may lack the adopted-layout keys)."""
    return cls.of(v.text_size, v.speech_size, speech_offset=getattr(v, "speech_offset", -1),
                  special_offset=getattr(v, "special_offset", -1),
                  special_ids=tuple(getattr(v, "special_ids", ())))

  @classmethod
  def of(cls, text_size: int, speech_size: int, *, speech_offset: int = -1,
         special_offset: int = -1,
         special_ids: tuple[tuple[str, int], ...] = ()) -> "Vocabulary":
    """The layout a config's vocab section describes: `special_ids` are the adopted specials;
    the other SPECIAL_TOKENS form the block at `special_offset`."""
    adopted = tuple((name, int(i)) for name, i in special_ids)
    names = {name for name, _ in adopted}
    return cls(text_size, speech_size,
               specials=tuple(n for n in SPECIAL_TOKENS if n not in names),
               speech_offset=speech_offset, special_offset=special_offset, adopted=adopted)

  @property
  def is_adopted(self) -> bool:
    """Whether any id comes from a base model's tokenizer rather than sptlm's own layout."""
    return self.speech_offset >= 0 or self.special_offset >= 0 or bool(self.adopted)

  def _check_adopted(self) -> None:
    ranges = [("<|audio_*|>", self.speech_start, self.speech_start + self.speech_size)]
    if self.specials:
      ranges.append((self.specials[0], self.special_start,
                     self.special_start + len(self.specials)))
    ranges += [(name, i, i + 1) for name, i in self.adopted]
    names = [name for name, _ in self.adopted]
    for name in names:
      if name in self.specials or names.count(name) > 1:
        raise ValueError(f"vocabulary: special token {name} is given twice")
    for name, lo, hi in ranges:
      if lo < 0:
        raise ValueError(f"vocabulary: {name} has the negative id {lo}")
    ranges.sort(key=lambda r: r[1])
    for (a, _, a_end), (b, b_lo, _) in zip(ranges, ranges[1:]):
      if b_lo < a_end:
        raise ValueError(f"vocabulary: the ids of {a} and {b} overlap (at {b_lo})")

  @property
  def speech_start(self) -> int:
    return self.text_size if self.speech_offset < 0 else self.speech_offset

  @property
  def special_start(self) -> int:
    if self.special_offset >= 0:
      return self.special_offset
    return max(self.text_size, self.speech_start + self.speech_size)

  @property
  def size(self) -> int:
    """Padded size: the number of rows of the embedding and the output layer."""
    used = max(self.text_size, self.speech_start + self.speech_size,
               self.special_start + len(self.specials))
    return -(-used // self.pad_multiple) * self.pad_multiple

  @property
  def special_names(self) -> tuple[str, ...]:
    """Every special token of the layout: the adopted ones, then the block's."""
    return tuple(name for name, _ in self.adopted) + self.specials

  def special_id(self, name: str) -> int:
    for adopted, i in self.adopted:
      if adopted == name:
        return i
    try:
      return self.special_start + self.specials.index(name)
    except ValueError:
      raise KeyError(f"unknown special token {name!r}; known: "
                     f"{', '.join(self.special_names)}") from None

  def speech_id(self, codes: np.ndarray) -> np.ndarray:
    """Maps raw codebook indices (0..K-1) to vocabulary ids."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= self.speech_size):
      raise ValueError(f"speech code out of range [0, {self.speech_size}): "
                       f"min {codes.min()}, max {codes.max()}")
    return codes + self.speech_start

  def speech_code(self, ids: np.ndarray) -> np.ndarray:
    """Maps vocabulary ids back to raw codebook indices; non-speech ids are an error."""
    ids = np.asarray(ids)
    if ids.size and not self.is_speech(ids).all():
      raise ValueError("speech_code: some ids are not speech tokens")
    return ids - self.speech_start

  def is_text(self, ids):
    if not self.is_adopted:
      return ids < self.speech_start
    # The base model's rows, less its speech tokens and the specials (adopted or placed).
    out = (ids < self.text_size) & ((ids < self.speech_start)
                                    | (ids >= self.speech_start + self.speech_size))
    out = out & ((ids < self.special_start) | (ids >= self.special_start + len(self.specials)))
    for _, i in self.adopted:
      out = out & (ids != i)
    return out

  def is_speech(self, ids):
    return (ids >= self.speech_start) & (ids < self.special_start)

  def token_name(self, i: int) -> str:
    """Readable name of a non-text id, e.g. `<|audio_17|>`."""
    if self.speech_start <= i < self.speech_start + self.speech_size:
      return f"<|audio_{i - self.speech_start}|>"
    if self.special_start <= i < self.special_start + len(self.specials):
      return self.specials[i - self.special_start]
    for name, adopted in self.adopted:
      if adopted == i:
        return name
    if i >= max(self.special_start, self.text_size):
      return f"<|unused_{i}|>"
    raise ValueError(f"id {i} is a text id; decode it with the text tokenizer")


_AUDIO = re.compile(r"<\|audio_(\d+)\|>")


def adopt(text_size: int, token_ids: Mapping[str, int], tokenizer_size: int
          ) -> Vocabulary | None:
  """The layout of a base model whose tokenizer already has speech tokens, else None.

  `token_ids`: the base tokenizer's ids of its `<|...|>` tokens; `tokenizer_size`: its largest
  id + 1; `text_size`: the base model's rows. The speech size is the run of `<|audio_k|>`
  tokens at consecutive ids from `<|audio_0|>`; the SPECIAL_TOKENS it has keep their ids; the
  others go to the first rows past everything the tokenizer uses, if the base has room, else
  after its rows. A gap or disorder in the audio tokens is a ValueError naming the token.
  """
  if "<|audio_0|>" not in token_ids:
    return None
  start = token_ids["<|audio_0|>"]
  codes = sorted(int(m.group(1)) for name in token_ids if (m := _AUDIO.fullmatch(name)))
  size = len(codes)
  for k, code in enumerate(codes):
    if code != k or token_ids[f"<|audio_{k}|>"] != start + k:
      bad = f"<|audio_{k}|>"
      got = token_ids.get(bad)
      raise ValueError(f"the tokenizer's {bad} has id {got}, not {start + k}: its speech "
                       "tokens are not one consecutive run from <|audio_0|>")
  if start + size > text_size:
    raise ValueError(f"the tokenizer's <|audio_{size - 1}|> has id {start + size - 1}, past "
                     f"the model's {text_size} rows")
  adopted = tuple((name, token_ids[name]) for name in SPECIAL_TOKENS if name in token_ids)
  missing = [name for name in SPECIAL_TOKENS if name not in token_ids]
  first_free = max([tokenizer_size, start + size] + [i + 1 for _, i in adopted])
  offset = first_free if first_free + len(missing) <= text_size else -1
  return Vocabulary.of(text_size, size, speech_offset=start,
                       special_offset=offset if missing else -1, special_ids=adopted)
