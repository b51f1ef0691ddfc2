"""A task's raw items -> training examples (token ids and loss weights), with per-item stats.

One place that knows every task kind, shared by `sptlm data materialize` (inside Beam workers:
built once per worker in DoFn.setup, so the text-to-token model loads once) and
`sptlm data inspect`. No TensorFlow here.
  text         the document's tokens + EOS, all in the loss
  interleaved  the document with ~eta of its tokens as speech spans (interleave.py) + EOS
  speech/asr/tts  a token record laid out as sources.py documents
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines import interleave as interleave_lib
from data_pipelines import sources
from data_pipelines import text_tokenizer as text_tokenizer_lib
from data_pipelines.config import DataPipelineConfig
from data_pipelines.vocabulary import Vocabulary
from sptlm import paths
from sptlm.errors import InputError


@dataclasses.dataclass(frozen=True)
class Built:
  ids: np.ndarray  # int32 vocabulary ids, EOS included where the kind has one
  weights: np.ndarray  # uint8, 1 where the loss counts
  spans: tuple[tuple[int, int, str], ...] = ()  # speech spans in ids: [start, end), source text
  text_tokens: int = 0  # interleaved: the document's LM tokens before interleaving
  span_tokens: tuple[int, ...] = ()  # interleaved: LM tokens of each span


class ExampleBuilder:
  """Loads the config's tokenizer (checked against vocab.text_size) and, when a task is
  interleaved, its text-to-token model; `build` turns items into examples."""

  def __init__(self, cfg: DataPipelineConfig, t2t: Any = None):
    self.cfg = cfg
    self.tokenizer = text_tokenizer_lib.load(str(paths.resolve(cfg.vocab.text_tokenizer)))
    text_tokenizer_lib.check_size(self.tokenizer, cfg.vocab.text_size)
    self.layout = Vocabulary(cfg.vocab.text_size, cfg.vocab.speech_size)
    self.eos = sources.eos_id(self.tokenizer, self.layout)
    self.interleaver = None
    if any(t.kind == "interleaved" for t in cfg.tasks):
      self.interleaver = self._interleaver(t2t)

  def _interleaver(self, t2t: Any) -> interleave_lib.Interleaver:
    i = self.cfg.interleave
    if t2t is None:
      from sptlm.t2t.synthesize import T2T
      t2t = T2T.load(str(paths.resolve(i.t2t)))
    if t2t.cfg.vocab.speech_size != self.cfg.vocab.speech_size:
      raise InputError(f"interleave.t2t {i.t2t} makes {t2t.cfg.vocab.speech_size} speech "
                       f"codes but vocab.speech_size is {self.cfg.vocab.speech_size}")
    return interleave_lib.Interleaver(self.tokenizer, self.layout, t2t.synthesize, lam=i.lam,
                                      eta=i.eta, seed=i.seed)

  def build(self, kind: str, items: Sequence[Any]) -> list[Built | str]:
    """One example per item (a document, or a (text, codes) record), or why it was skipped;
    interleaved documents go to the text-to-token model in one batch."""
    if kind == "interleaved":
      out: list[Built | str] = []
      for e in self.interleaver.interleave(list(items)):
        if isinstance(e, str):
          out.append(e)
        else:
          ids = np.append(e.ids, np.int32(self.eos)).astype(np.int32)
          out.append(Built(ids, np.ones(len(ids), np.uint8), e.spans, e.text_tokens,
                           e.span_tokens))
      return out
    if kind == "text":
      return [self._text(d) for d in items]
    return [Built(*(a.astype(t) for a, t in zip(
        sources.layout_record(self.tokenizer, self.layout, kind, text, codes),
        (np.int32, np.uint8)))) for text, codes in items]

  def _text(self, document: str) -> Built | str:
    ids = self.tokenizer.encode(document)
    if not ids:
      return "documents without text tokens"
    ids = np.asarray(ids + [self.eos], np.int32)
    return Built(ids, np.ones(len(ids), np.uint8))

  def stats(self, b: Built) -> dict[str, int]:
    """Token counts of one example, summed into a task's statistics."""
    return {"examples": 1, "tokens": len(b.ids),
            "speech tokens": int(self.layout.is_speech(b.ids).sum()),
            "loss tokens": int(b.weights.sum()), "spans": len(b.spans),
            "lm tokens": b.text_tokens, "lm tokens spoken": sum(b.span_tokens)}
