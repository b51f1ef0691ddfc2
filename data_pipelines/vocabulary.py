"""The token id layout shared by the model, the data tasks and the converters.

Text ids come first (a SentencePiece or Hugging Face text vocabulary), then one id per speech
codebook entry `<|audio_0|>` ... `<|audio_{K-1}|>`, then the special tokens, and the total is
padded to a multiple of 128 so the embedding shards evenly. Speech tokens are stored on disk as
raw codebook indices (0..K-1); `speech_id` adds the offset only when examples are built, so a
new layout never needs re-extraction.
"""

import dataclasses

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
  specials: tuple[str, ...] = SPECIAL_TOKENS

  def __post_init__(self) -> None:
    if self.text_size <= 0 or self.speech_size < 0:
      raise ValueError(f"vocabulary: text_size={self.text_size} and speech_size="
                       f"{self.speech_size} must be positive")

  @property
  def speech_start(self) -> int:
    return self.text_size

  @property
  def special_start(self) -> int:
    return self.text_size + self.speech_size

  @property
  def size(self) -> int:
    """Padded size: the number of rows of the embedding and the output layer."""
    used = self.special_start + len(self.specials)
    return -(-used // self.pad_multiple) * self.pad_multiple

  def special_id(self, name: str) -> int:
    try:
      return self.special_start + self.specials.index(name)
    except ValueError:
      raise KeyError(f"unknown special token {name!r}; known: {', '.join(self.specials)}") from None

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
    return ids < self.speech_start

  def is_speech(self, ids):
    return (ids >= self.speech_start) & (ids < self.special_start)

  def token_name(self, i: int) -> str:
    """Readable name of a non-text id, e.g. `<|audio_17|>`."""
    if self.speech_start <= i < self.special_start:
      return f"<|audio_{i - self.speech_start}|>"
    if self.special_start <= i < self.special_start + len(self.specials):
      return self.specials[i - self.special_start]
    if i >= self.special_start:
      return f"<|unused_{i}|>"
    raise ValueError(f"id {i} is a text id; decode it with the text tokenizer")
