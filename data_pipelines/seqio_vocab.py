"""The speech-text vocabulary as a seqio.Vocabulary, for seqio tasks, mixtures and evaluators.

Ids are laid out as data_pipelines.vocabulary says: the text tokenizer's ids, then
`<|audio_0|>` ... `<|audio_{K-1}|>`, then the special tokens. A mixed sequence is written as
text with those markers inline (GLM-4-Voice's format), e.g.
"the cat <|begin_of_audio|><|audio_12|><|audio_7|><|end_of_audio|> sat"; encode and decode
map between such strings and ids. `readable` renders speech spans as `[audio: N tokens]` for
people; `text_mask` / `speech_mask` split per-modality metrics.
"""

import re
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf

from data_pipelines import sources
from data_pipelines.text_tokenizer import TextTokenizer
from data_pipelines.vocabulary import Vocabulary
from sptlm.errors import InputError

_MARKER = re.compile(r"<\|audio_(\d+)\|>|<\|[a-z_]+\|>")


class SpeechTextVocabulary(seqio.Vocabulary):
  """[text tokenizer | speech codes | specials] with GLM-4-Voice-style markers in strings."""

  def __init__(self, tokenizer: TextTokenizer, layout: Vocabulary):
    self.tokenizer, self.layout = tokenizer, layout
    self._special_names = set(layout.specials)
    super().__init__(extra_ids=0)

  @property
  def eos_id(self) -> int | None:
    return sources.eos_id(self.tokenizer, self.layout)

  @property
  def unk_id(self) -> int | None:
    return None

  @property
  def pad_id(self) -> int:
    return self.layout.special_id("<|pad|>")

  @property
  def _base_vocab_size(self) -> int:
    return self.layout.size

  def _encode(self, s: str) -> list[int]:
    ids: list[int] = []
    pos = 0
    for m in _MARKER.finditer(s):
      name = m.group(0)
      if m.group(1) is None and name not in self._special_names:
        continue  # not one of ours: plain text
      if m.start() > pos:
        ids += self.tokenizer.encode(s[pos:m.start()])
      if m.group(1) is not None:
        code = int(m.group(1))
        if code >= self.layout.speech_size:
          raise InputError(f"{name}: speech code {code} is outside the codebook "
                           f"[0, {self.layout.speech_size})")
        ids.append(self.layout.speech_start + code)
      else:
        ids.append(self.layout.special_id(name))
      pos = m.end()
    if pos < len(s):
      ids += self.tokenizer.encode(s[pos:])
    return ids

  def _runs(self, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
    """Consecutive ids grouped by kind: text, speech, special, padding rows."""
    runs: list[tuple[str, list[int]]] = []
    for i in ids:
      i = int(i)
      if i < self.layout.speech_start:
        kind = "text"
      elif i < self.layout.special_start:
        kind = "speech"
      elif i < self.layout.special_start + len(self.layout.specials):
        kind = "special"
      else:
        kind = "padding"
      if runs and runs[-1][0] == kind:
        runs[-1][1].append(i)
      else:
        runs.append((kind, [i]))
    return runs

  def _decode(self, ids: Sequence[int]) -> str:
    out = []
    for kind, run in self._runs(ids):
      if kind == "text":
        out.append(self.tokenizer.decode(run))
      elif kind == "speech":
        out.append("".join(f"<|audio_{i - self.layout.speech_start}|>" for i in run))
      elif kind == "special":
        out.append("".join(self.layout.specials[i - self.layout.special_start] for i in run))
    return "".join(out)

  def readable(self, ids: Sequence[int], span_texts: Sequence[str] = ()) -> str:
    """Text as text, each speech run as `[audio: N tokens]` (plus its source text if given)."""
    out, k = [], 0
    for kind, run in self._runs(ids):
      if kind == "text":
        out.append(self.tokenizer.decode(run))
      elif kind == "speech":
        said = f' "{" ".join(span_texts[k].split())}"' if k < len(span_texts) else ""
        out.append(f"[audio: {len(run)} tokens{said}]")
        k += 1
    return " ".join(x.strip() for x in out if x.strip())

  def text_mask(self, ids: np.ndarray) -> np.ndarray:
    return self.layout.is_text(np.asarray(ids))

  def speech_mask(self, ids: np.ndarray) -> np.ndarray:
    return self.layout.is_speech(np.asarray(ids))

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    def enc(x: bytes | np.ndarray) -> np.ndarray:
      x = x.item() if isinstance(x, np.ndarray) else x
      return np.asarray(self._encode(x.decode("utf-8")), np.int32)
    out = tf.numpy_function(enc, [s], tf.int32, stateful=False)
    out.set_shape([None])
    return out

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """[..., L] ids -> [...] strings."""
    def dec(x: np.ndarray) -> np.ndarray:
      flat = x.reshape(-1, x.shape[-1])
      return np.array([self._decode(r.tolist()).encode("utf-8") for r in flat],
                      dtype=object).reshape(x.shape[:-1])
    out = tf.numpy_function(dec, [ids], tf.string, stateful=False)
    out.set_shape(ids.shape[:-1])
    return out

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, SpeechTextVocabulary) and other.layout == self.layout
            and other.tokenizer.path == self.tokenizer.path)

  def __hash__(self) -> int:
    return hash((self.layout, self.tokenizer.path))
