"""Interleaved speech-text examples from text documents (the method's synthetic data).

Per document, in LM text tokens as the paper counts: span lengths are drawn from
Poisson(lambda) (a draw of 0 counts as 1) until they add up to ceil(eta x the document's
tokens), the last span cut to land there exactly; the spans are shuffled and placed at random
without overlap (every arrangement of the spans and the text between them equally likely). Each
span's text (the exact characters its tokens cover) becomes speech tokens through a synthesize
function (the text-to-token model), wrapped in <|begin_of_audio|> ... <|end_of_audio|>; the rest
stays text. The draw is seeded by a hash of the document and the global seed, so a document's
example is the same whatever the sharding, worker count or order. Spans of all the documents
of a call are synthesized in one batch.
"""

import collections
import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np

from data_pipelines.text_tokenizer import TextTokenizer
from data_pipelines.vocabulary import Vocabulary

# texts -> raw codebook indices (0..K-1) per text; T2T.synthesize fits
Synthesize = Callable[[list[str]], list[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Example:
  """One interleaved document: its ids and, per speech span, (start, end, text) in `ids`."""

  ids: np.ndarray  # int32 vocabulary ids
  spans: tuple[tuple[int, int, str], ...]  # [start, end) of each <|begin_of_audio|>..<|end|>
  text_tokens: int  # the document's LM tokens before interleaving
  span_tokens: tuple[int, ...]  # LM tokens of each span (what lambda and eta are about)


def document_rng(document: str, seed: int) -> np.random.Generator:
  digest = hashlib.blake2b(document.encode("utf-8"), digest_size=8).digest()
  return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def choose_spans(n_tokens: int, rng: np.random.Generator, lam: float = 10.0,
                 eta: float = 0.3) -> list[tuple[int, int]]:
  """Sorted, non-overlapping [start, end) token spans covering ceil(eta x n_tokens) tokens."""
  target = min(n_tokens, math.ceil(eta * n_tokens))
  lengths: list[int] = []
  total = 0
  while total < target:
    n = min(max(int(rng.poisson(lam)), 1), target - total)
    lengths.append(n)
    total += n
  if not lengths:
    return []
  rng.shuffle(lengths)
  # k spans and n - total free tokens: choose the k span slots among (free + k) items
  free = n_tokens - total
  slots = np.sort(rng.choice(free + len(lengths), size=len(lengths), replace=False))
  spans, before = [], 0
  for i, (slot, n) in enumerate(zip(slots, lengths)):
    start = int(slot) - i + before  # the free tokens before it + the earlier spans
    spans.append((start, start + n))
    before += n
  return spans


class Interleaver:
  """Documents -> interleaved examples, with counts of everything skipped."""

  def __init__(self, tokenizer: TextTokenizer, vocab: Vocabulary, synthesize: Synthesize, *,
               lam: float = 10.0, eta: float = 0.3, seed: int = 0,
               max_chars: int = 1_000_000):
    self.tokenizer, self.vocab, self.synthesize = tokenizer, vocab, synthesize
    self.lam, self.eta, self.seed, self.max_chars = lam, eta, seed, max_chars
    self.boa = vocab.special_id("<|begin_of_audio|>")
    self.eoa = vocab.special_id("<|end_of_audio|>")
    self.counts: collections.Counter = collections.Counter()

  def __call__(self, documents: Sequence[str | bytes]) -> list[Example | None]:
    """One example per document; None (counted) for one that cannot be used."""
    return [e if isinstance(e, Example) else None for e in self.interleave(documents)]

  def interleave(self, documents: Sequence[str | bytes]) -> list[Example | str]:
    """One example per document, or the reason (counted) it cannot be used."""
    plans = [self._plan(d) for d in documents]
    texts = [t for p in plans if not isinstance(p, str) for _, _, t in p[2]]
    codes = iter(self.synthesize(texts) if texts else [])
    return [p if isinstance(p, str) else self._build(p, codes) for p in plans]

  def _skip(self, reason: str) -> str:
    self.counts[reason] += 1
    return reason

  def _plan(self, document: str | bytes):
    if isinstance(document, bytes):
      try:
        document = document.decode("utf-8")
      except UnicodeDecodeError:
        return self._skip("non-UTF-8 documents")
    if not document.strip():
      return self._skip("empty documents")
    if len(document) > self.max_chars:
      self.counts[f"documents cut to {self.max_chars:,} characters"] += 1
      document = document[:self.max_chars]
    ids, offsets = self.tokenizer.encode_with_offsets(document)
    if not ids:
      return self._skip("documents without text tokens")
    spans = choose_spans(len(ids), document_rng(document, self.seed), self.lam, self.eta)
    return ids, spans, [(a, b, document[offsets[a][0]:offsets[b - 1][1]].strip())
                        for a, b in spans]

  def _build(self, plan, codes) -> Example:
    ids, spans, span_texts = plan
    out: list[np.ndarray] = []
    where, pos = [], 0
    n = 0
    for (a, b), (_, _, text) in zip(spans, span_texts):
      speech = next(codes)
      out.append(np.asarray(ids[pos:a], np.int32))
      n += a - pos
      if len(speech) == 0:  # nothing speakable: the span stays text, counted
        self.counts["spans kept as text (no speech)"] += 1
        out.append(np.asarray(ids[a:b], np.int32))
        n += b - a
      else:
        piece = np.concatenate([[self.boa], self.vocab.speech_id(speech), [self.eoa]])
        out.append(piece.astype(np.int32))
        where.append((n, n + len(piece), text))
        n += len(piece)
      pos = b
    out.append(np.asarray(ids[pos:], np.int32))
    self.counts["documents"] += 1
    return Example(ids=np.concatenate(out), spans=tuple(where), text_tokens=len(ids),
                   span_tokens=tuple(b - a for a, b in spans))
