"""A task's raw items -> training examples (token ids and loss weights), with per-item stats.

One place that knows every task kind, shared by `sptlm data materialize` (inside Beam workers:
built once per worker in DoFn.setup, so the text-to-token model loads once) and
`sptlm data inspect`. No TensorFlow here.
  text         the document's tokens + EOS, all in the loss
  interleaved  the document with ~eta of its tokens as speech spans (interleave.py) + EOS
  speech/asr/tts  a token record laid out as sources.py documents; records that bring audio
               instead of tokens go through the speech tokenizer (vocab.speech_tokenizer)
"""

import collections
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from data_pipelines import interleave as interleave_lib
from data_pipelines import records, sources
from data_pipelines import text_tokenizer as text_tokenizer_lib
from data_pipelines.config import TEXT_KINDS, DataPipelineConfig, TaskSpec
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
  cut: bool = False  # the document was longer than max_chars and was cut there


class ExampleBuilder:
  """Loads the config's tokenizer (checked against vocab.text_size) and, when a task is
  interleaved, its text-to-token model; `build` turns items into examples."""

  def __init__(self, cfg: DataPipelineConfig, t2t: Any = None, max_chars: int = 1_000_000):
    self.cfg, self.max_chars = cfg, max_chars
    self.tokenizer = text_tokenizer_lib.load(str(paths.resolve(cfg.vocab.text_tokenizer)))
    text_tokenizer_lib.check_size(self.tokenizer, cfg.vocab.text_size)
    self.layout = Vocabulary.from_config(cfg.vocab)
    self.eos = sources.eos_id(self.tokenizer, self.layout)
    self.interleaver = None
    self.speech_tokenizer = None  # loaded when a record brings audio
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
                                      eta=i.eta, seed=i.seed, max_chars=self.max_chars)

  def build(self, kind: str, items: Sequence[Any]) -> list[Built | str]:
    """One example per item (a document, or a (text, codes) record), or why it was skipped;
    interleaved documents go to the text-to-token model in one batch."""
    if kind == "interleaved":
      out: list[Built | str] = []
      for doc, e in zip(items, self.interleaver.interleave(list(items))):
        if isinstance(e, str):
          out.append(e)
        else:
          ids = np.append(e.ids, np.int32(self.eos)).astype(np.int32)
          out.append(Built(ids, np.ones(len(ids), np.uint8), e.spans, e.text_tokens,
                           e.span_tokens, cut=len(doc) > self.max_chars))
      return out
    if kind == "text":
      return [self._text(d) for d in items]
    codes = self._codes([c for _, c in items])
    return [c if isinstance(c, str) else Built(*(a.astype(t) for a, t in zip(
        sources.layout_record(self.tokenizer, self.layout, kind, text, c),
        (np.int32, np.uint8)))) for (text, _), c in zip(items, codes)]

  def _codes(self, codes: list[np.ndarray | sources.AudioFile]) -> list[np.ndarray | str]:
    """Speech codes of each record: given, or its audio through the speech tokenizer (in one
    batch); the reason for audio that cannot be read."""
    files = [c.path for c in codes if isinstance(c, sources.AudioFile)]
    if not files:
      return codes
    encoded = iter(self._speech_tokenizer().encode_files(files))
    out: list[np.ndarray | str] = []
    for c in codes:
      if not isinstance(c, sources.AudioFile):
        out.append(c)
        continue
      row = next(encoded)
      if "error" in row:
        out.append("unreadable audio files")
      elif not row["tokens"]:
        out.append("audio files without speech tokens")
      else:
        out.append(np.asarray(row["tokens"], np.int32))
    return out

  def _speech_tokenizer(self) -> Any:
    if self.speech_tokenizer is None:
      path = self.cfg.vocab.speech_tokenizer
      if not path:
        raise InputError("a task reads audio records ({\"audio\": ...} lines): set "
                         "vocab.speech_tokenizer to a `sptlm tokenizer train` work directory")
      from sptlm.speech.tokenizer import SpeechTokenizer
      self.speech_tokenizer = SpeechTokenizer.load(str(paths.resolve(path)), lm=None)
      if self.speech_tokenizer.codebook_size != self.cfg.vocab.speech_size:
        raise InputError(f"vocab.speech_tokenizer {path} has {self.speech_tokenizer.codebook_size}"
                         f" codes but vocab.speech_size is {self.cfg.vocab.speech_size}")
    return self.speech_tokenizer

  def _text(self, document: str) -> Built | str:
    cut = len(document) > self.max_chars
    ids = self.tokenizer.encode(document[:self.max_chars])
    if not ids:
      return "documents without text tokens"
    ids = np.asarray(ids + [self.eos], np.int32)
    return Built(ids, np.ones(len(ids), np.uint8), cut=cut)

  def stats(self, b: Built) -> dict[str, int]:
    """Token counts of one example, summed into a task's statistics."""
    unk = self.tokenizer.unk_id()
    return {"examples": 1, "tokens": len(b.ids),
            "speech tokens": int(self.layout.is_speech(b.ids).sum()),
            "loss tokens": int(b.weights.sum()), "spans": len(b.spans),
            "lm tokens": b.text_tokens, "lm tokens spoken": sum(b.span_tokens),
            "unknown text tokens": 0 if unk is None else int((b.ids == unk).sum()),
            f"documents cut to {self.max_chars:,} characters": int(b.cut)}


def build_records(builder: Any, task: TaskSpec, items: Sequence[Any], batch: int,
                  desc: str) -> tuple[list[bytes], dict[str, Any]]:
  """(records, statistics) of a task's items, in order, in fixed batches of `batch`."""
  counts: collections.Counter = collections.Counter()
  skipped: collections.Counter = collections.Counter()
  usable = []
  for item in items:
    if isinstance(item, sources.Skipped):
      skipped[item.reason] += 1
    else:
      usable.append(item)
  payloads: list[bytes] = []
  bar = tqdm(total=len(usable), desc=desc, unit="item", leave=False,
             mininterval=0.5 if sys.stderr.isatty() else 30.0)
  for start in range(0, len(usable), batch):
    chunk = usable[start:start + batch]
    bar.update(len(chunk))
    for b in builder.build(task.kind, chunk):
      if isinstance(b, str):
        skipped[b] += 1
        continue
      payloads.append(records.encode(b.ids, b.weights))
      counts.update(builder.stats(b))
      counts["max example tokens"] = max(counts["max example tokens"], len(b.ids))
  bar.close()
  return payloads, {"items": len(items), **counts, "skipped": dict(sorted(skipped.items()))}


def task_summary(task: TaskSpec, shard_stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """A task's statistics (stats.json's entry) from its shards' statistics."""
  total: collections.Counter = collections.Counter()
  skipped: collections.Counter = collections.Counter()
  max_tokens = 0
  for st in shard_stats:
    st = dict(st)
    skipped.update(st.pop("skipped", {}))
    max_tokens = max(max_tokens, st.pop("max example tokens", 0))
    total.update({k: v for k, v in st.items() if isinstance(v, int) and k != "shard"})
  t = {"kind": task.kind, "rate": task.rate, "shards": task.shards, **dict(total),
       "max example tokens": max_tokens, "skipped": dict(sorted(skipped.items()))}
  t["tokens per example"] = total["tokens"] / total["examples"] if total["examples"] else 0.0
  if total["spans"]:
    t["span length mean"] = total["lm tokens spoken"] / total["spans"]
    t["spoken fraction"] = total["lm tokens spoken"] / total["lm tokens"]
  return t


def task_items(task: TaskSpec, speech_size: int) -> Iterator[Any]:
  """Every item of a task's files, in order: documents, token records or Skipped."""
  for name in task.files:
    if task.kind in TEXT_KINDS:
      yield from sources.file_documents(name)
    else:
      yield from sources.file_token_records(name, speech_size, task.kind != "speech")
