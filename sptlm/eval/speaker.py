"""The eval's texts as token ids in either modality.

Text goes through the LM's text tokenizer. Speech is <|begin_of_audio|> codes
<|end_of_audio|>, the codes from real audio through the speech tokenizer when the user gives
audio, otherwise from the text-to-token model (synthesized once per distinct text). Results
name the source, so a figure from synthetic speech is never mistaken for one from recordings.
"""

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class Speaker:

  def __init__(self, lm: Any, *, t2t: Any = None, tokenizer: Any = None, source: str = ""):
    self.lm, self.t2t, self.tokenizer, self.source = lm, t2t, tokenizer, source
    self.boa = lm.vocab.special_id("<|begin_of_audio|>")
    self.eoa = lm.vocab.special_id("<|end_of_audio|>")
    self.codes: dict[str, np.ndarray] = {}
    self.problems: collections.Counter = collections.Counter()

  def prepare(self, texts: Sequence[str]) -> None:
    """Synthesizes the texts that have no speech yet (a no-op with audio: what has no
    audio stays unspeakable)."""
    if self.t2t is None:
      return
    todo = sorted({t for t in texts if t not in self.codes})
    if todo:
      for t, c in zip(todo, self.t2t.synthesize(todo)):
        self.codes[t] = c

  def load_audio(self, files: Mapping[str, Sequence[str]]) -> None:
    """Tokenizes each text's WAV files (concatenated in order); a text with a missing or
    unreadable file gets no speech, and the file is counted."""
    distinct = sorted({f for fs in files.values() for f in fs})
    encoded = {}
    for row in self.tokenizer.encode_files(distinct):
      encoded[row["audio"]] = row.get("tokens")
      if "error" in row:
        self.problems["missing or unreadable audio files"] += 1
    for text, fs in files.items():
      parts = [encoded.get(f) for f in fs]
      if all(p is not None for p in parts):
        self.codes[text] = np.concatenate([np.asarray(p, np.int64) for p in parts])

  def ids(self, text: str, modality: str) -> list[int] | None:
    """The text in "T" or "S"; None when it has no speech."""
    if modality == "T":
      return self.lm.tokenizer.encode(text)
    codes = self.codes.get(text)
    if codes is None or len(codes) == 0:
      return None
    return [self.boa] + self.lm.vocab.speech_id(np.asarray(codes)).tolist() + [self.eoa]
