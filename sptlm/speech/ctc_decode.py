"""CTC prefix beam search with a word n-gram language model and a lexicon.

Greedy CTC decoding of letter units is phonetically right but misspelled ("som", "mak" for
some, make): nothing above the acoustic frames knows which words exist. This module adds that
knowledge from text alone, the usual fix for CTC (and the counterpart of the implicit language
model of an attention decoder): a word n-gram model (`NgramLM`, interpolated modified
Kneser-Ney, saved and loaded as ARPA so a KenLM-built model can replace it) and a prefix beam
search (`beam_search`) in which partial words must be prefixes of known words (the lexicon) and
each finished word is scored `alpha * ln p_lm(word | history) + beta`.

  lm = NgramLM.train(normalized_sentences, order=3)
  lm.save_arpa("asr_lm.arpa")
  text = beam_search(log_probs_TxC, units, lm)   # log-softmax [T, C], class 0 blank

Pure Python + numpy, one CPU core: about 10 ms per 3 s utterance (150 CTC frames) at beam 16
and 20 ms at beam 32; memory does not grow with the input's length.
"""

import gzip
import heapq
import math
import pathlib
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
_SPECIAL = (BOS, EOS, UNK)
_LN10 = math.log(10.0)
_ARPA_MISSING_UNK_LOG10 = -100.0  # KenLM's probability for <unk> when a file lists none
_ARPA_BOS_LOG10 = -99.0  # <s> is never predicted: its ARPA probability is a placeholder
_FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback
_NEG = float("-inf")
_WORD_START = "\u2581"  # SentencePiece's '▁'


# ---- The language model ---------------------------------------------------------------------


class NgramLM:
  """A word n-gram language model in backoff (ARPA) form; scores are natural logs.

  `train` estimates interpolated modified Kneser-Ney (Chen & Goodman 1998, as KenLM's lmplz):
  three discounts per order (for counts 1, 2, 3+) from the count-of-counts, continuation counts
  for the lower orders (raw counts for n-grams starting with <s>), and a unigram distribution
  interpolated with the uniform one over the vocabulary + </s> + <unk>; so every context's
  distribution over those words sums to 1, and a word outside the vocabulary gets p(<unk>).
  Sentences are padded with one <s> and </s>.
  """

  def __init__(self, order: int, probs: dict[tuple[str, ...], float],
               backoffs: dict[tuple[str, ...], float]):
    """`probs`: n-gram -> ln p(last word | the others) for every listed n-gram (all orders);
    `backoffs`: n-gram -> ln backoff weight (missing: 0)."""
    if order < 1:
      raise ValueError(f"n-gram order must be >= 1, not {order}")
    self.order = order
    self._prob = probs
    self._bow = {k: v for k, v in backoffs.items() if v != 0.0}
    self._contexts = {g[:-1] for g in probs if len(g) > 1}  # what a longer n-gram extends
    self._contexts.update(self._bow)
    unigrams = {g[0] for g in probs if len(g) == 1}
    self._known = unigrams - {BOS}  # words that are predicted as themselves (incl. </s>)
    self.vocab = frozenset(unigrams - set(_SPECIAL))
    unk = probs.get((UNK,))
    self.unk_logprob = unk if unk is not None else _ARPA_MISSING_UNK_LOG10 * _LN10
    self._cache: dict[tuple[tuple[str, ...], str], tuple[float, tuple[str, ...]]] = {}
    self._lexicon: dict[str, float] | None = None

  def __repr__(self) -> str:
    return (f"NgramLM(order={self.order}, vocab={len(self.vocab)}, "
            f"ngrams={self.num_ngrams()})")

  def num_ngrams(self) -> list[int]:
    counts = [0] * self.order
    for g in self._prob:
      counts[len(g) - 1] += 1
    return counts

  # -- Scoring --------------------------------------------------------------------------------

  def begin(self) -> tuple[str, ...]:
    """The state at the start of a sentence."""
    return self._minimize((BOS,))

  def score(self, state: tuple[str, ...], word: str) -> tuple[float, tuple[str, ...]]:
    """(ln p(word | state), the state after it); words outside the vocabulary are <unk>."""
    key = (state, word)
    hit = self._cache.get(key)
    if hit is None:
      w = word if word in self._known else UNK
      lp = self._logprob(state, w)
      hit = (lp, self._minimize(state + (w,)))
      if len(self._cache) > 1_000_000:
        self._cache.clear()
      self._cache[key] = hit
    return hit

  def logprob(self, word: str, context: Sequence[str] = ()) -> float:
    """ln p(word | context words); start the context with <s> for a sentence start."""
    w = word if word in self._known else UNK
    ctx = tuple(c if c in self._known or c == BOS else UNK for c in context)
    return self._logprob(ctx[len(ctx) - self.order + 1:] if self.order > 1 else (), w)

  def sentence_logprob(self, sentence: str, *, eos: bool = True) -> float:
    """ln p of a normalized sentence after <s> (and of </s> after it)."""
    state, total = self.begin(), 0.0
    for w in sentence.split() + ([EOS] if eos else []):
      lp, state = self.score(state, w)
      total += lp
    return total

  def perplexity(self, sentences: Iterable[str]) -> float:
    """Per-word perplexity (</s> counted as a word, like SRILM's ppl)."""
    total, n = 0.0, 0
    for s in sentences:
      total += self.sentence_logprob(s)
      n += len(s.split()) + 1
    return math.exp(-total / max(n, 1))

  def _logprob(self, ctx: tuple[str, ...], w: str) -> float:
    total = 0.0
    while True:
      p = self._prob.get(ctx + (w,))
      if p is not None:
        return total + p
      if not ctx:
        return total + self.unk_logprob
      total += self._bow.get(ctx, 0.0)
      ctx = ctx[1:]

  def _minimize(self, state: tuple[str, ...]) -> tuple[str, ...]:
    """The shortest suffix of the history that scores every next word the same."""
    state = state[len(state) - self.order + 1:] if self.order > 1 else ()
    while state and state not in self._contexts:
      state = state[1:]
    return state

  # -- Lexicon ----------------------------------------------------------------------------------

  @property
  def lexicon(self) -> dict[str, float]:
    """Every prefix of a vocabulary word (including the word itself and "") -> the highest
    unigram ln p of a word starting with it (the partial-word look-ahead of the search)."""
    if self._lexicon is None:
      best: dict[str, float] = {}
      for w in self.vocab:
        lp = self._prob[(w,)]
        for i in range(len(w) + 1):
          p = w[:i]
          if best.get(p, _NEG) < lp:
            best[p] = lp
      self._lexicon = best
    return self._lexicon

  # -- Training ---------------------------------------------------------------------------------

  @classmethod
  def train(cls, sentences: Iterable[str], order: int = 3) -> "NgramLM":
    """Interpolated modified Kneser-Ney from normalized sentences (words split on spaces)."""
    if order < 1:
      raise ValueError(f"n-gram order must be >= 1, not {order}")
    counts: list[Counter] = [Counter() for _ in range(order)]
    for s in sentences:
      words = s.split()
      if not words:
        continue
      toks = (BOS, *words, EOS)
      for n in range(1, order + 1):
        c = counts[n - 1]
        for i in range(len(toks) - n + 1):
          c[toks[i:i + n]] += 1
    if not counts[0]:
      raise ValueError("cannot train a language model on no words")

    # Adjusted counts: raw for the top order and for n-grams that start with <s> (nothing can
    # precede them); otherwise the number of distinct words seen before the n-gram.
    adjusted: list[dict[tuple[str, ...], int]] = [dict(c) for c in counts]
    for n in range(1, order):
      cont: Counter = Counter()
      for g in counts[n]:
        cont[g[1:]] += 1
      adj = adjusted[n - 1]
      for g in adj:
        if g[0] != BOS:
          adj[g] = cont[g]
    del adjusted[0][(BOS,)]  # never predicted

    probs: dict[tuple[str, ...], float] = {}
    backoffs: dict[tuple[str, ...], float] = {}
    vocab_size = len(adjusted[0]) + (0 if (UNK,) in adjusted[0] else 1)
    lower: dict[tuple[str, ...], float] = {}  # interpolated p of the order below
    for n in range(1, order + 1):
      adj = adjusted[n - 1]
      d = _discounts(adj.values())
      denom: dict[tuple[str, ...], float] = {}
      mass: dict[tuple[str, ...], float] = {}  # discounted mass of each context
      for g, a in adj.items():
        h = g[:-1]
        denom[h] = denom.get(h, 0) + a
        mass[h] = mass.get(h, 0.0) + d[min(a, 3) - 1]
      gamma = {h: mass[h] / denom[h] for h in denom}
      current: dict[tuple[str, ...], float] = {}
      for g, a in adj.items():
        h = g[:-1]
        below = 1.0 / vocab_size if n == 1 else lower[g[1:]]
        current[g] = (a - d[min(a, 3) - 1]) / denom[h] + gamma[h] * below
      if n == 1 and (UNK,) not in current:
        current[(UNK,)] = gamma[()] / vocab_size
      for h, gm in gamma.items():
        if h:
          backoffs[h] = math.log(gm)
      probs.update((g, math.log(p)) for g, p in current.items())
      lower = current
    probs[(BOS,)] = _ARPA_BOS_LOG10 * _LN10
    return cls(order, probs, backoffs)

  # -- ARPA -------------------------------------------------------------------------------------

  def save_arpa(self, path: str | pathlib.Path) -> None:
    """The standard ARPA text format (log10 probabilities and backoffs), sorted n-grams;
    `.gz` paths are compressed."""
    by_order: list[list[tuple[str, ...]]] = [[] for _ in range(self.order)]
    for g in self._prob:
      by_order[len(g) - 1].append(g)
    lines = ["\\data\\"]
    lines += [f"ngram {n + 1}={len(gs)}" for n, gs in enumerate(by_order)]
    for n, grams in enumerate(by_order):
      lines += ["", f"\\{n + 1}-grams:"]
      for g in sorted(grams):
        row = f"{self._prob[g] / _LN10!r}\t{' '.join(g)}"
        if n + 1 < self.order and g in self._bow:
          row += f"\t{self._bow[g] / _LN10!r}"
        lines.append(row)
    lines += ["", "\\end\\", ""]
    text = "\n".join(lines)
    p = pathlib.Path(path)
    tmp = p.with_name(p.name + ".part")
    if p.suffix == ".gz":
      tmp.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    else:
      tmp.write_text(text, encoding="utf-8")
    tmp.replace(p)

  @classmethod
  def load_arpa(cls, path: str | pathlib.Path) -> "NgramLM":
    """An ARPA file (from `save_arpa`, KenLM's lmplz or SRILM; `.gz` too). Text before \\data\\
    is ignored; anything malformed raises ValueError naming the file and line."""
    p = pathlib.Path(path)
    try:
      raw = p.read_bytes()
      if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
      text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"{p}: cannot read ARPA language model: {e}") from None
    lines = text.split("\n")
    if lines and not lines[-1]:
      lines.pop()  # the final newline
    return _parse_arpa(lines, str(p))


def _discounts(adjusted_counts: Iterable[int]) -> tuple[float, float, float]:
  """Modified Kneser-Ney discounts D1, D2, D3+ from the count-of-counts (Chen & Goodman);
  KenLM's fallback (0.5, 1, 1.5) where the counts are too few to estimate them."""
  t = [0, 0, 0, 0, 0]
  for a in adjusted_counts:
    if a <= 4:
      t[a] += 1
  if min(t[1:]) == 0:
    return _FALLBACK_DISCOUNTS
  y = t[1] / (t[1] + 2 * t[2])
  d = (1 - 2 * y * t[2] / t[1], 2 - 3 * y * t[3] / t[2], 3 - 4 * y * t[4] / t[3])
  if not all(0 < dk < k for k, dk in enumerate(d, 1)):
    return _FALLBACK_DISCOUNTS
  return d


def _parse_arpa(lines: list[str], name: str) -> NgramLM:
  def fail(i: int, msg: str) -> ValueError:
    return ValueError(f"{name}:{i + 1}: {msg} (not a valid ARPA language model)")

  i = 0
  while i < len(lines) and lines[i].strip() != "\\data\\":
    i += 1
  if i == len(lines):
    raise fail(max(len(lines) - 1, 0), "no \\data\\ header")
  i += 1
  expected: dict[int, int] = {}
  while i < len(lines):
    line = lines[i].strip()
    if line.startswith("ngram "):
      key, eq, val = line[6:].partition("=")
      try:
        n, count = int(key), int(val)
      except ValueError:
        raise fail(i, f"bad count line {line!r}") from None
      if not eq or n < 1 or count < 0 or n in expected:
        raise fail(i, f"bad count line {line!r}")
      expected[n] = count
    elif line:
      break
    i += 1
  order = len(expected)
  if order == 0 or sorted(expected) != list(range(1, order + 1)):
    raise fail(i if i < len(lines) else len(lines) - 1,
               f"\\data\\ must list ngram 1=..., 2=..., in order (got {sorted(expected)})")
  probs: dict[tuple[str, ...], float] = {}
  backoffs: dict[tuple[str, ...], float] = {}
  for n in range(1, order + 1):
    while i < len(lines) and not lines[i].strip():
      i += 1
    if i == len(lines) or lines[i].strip() != f"\\{n}-grams:":
      got = lines[i].strip() if i < len(lines) else "end of file"
      raise fail(min(i, len(lines) - 1), f"expected \\{n}-grams:, found {got[:60]!r}")
    i += 1
    seen = 0
    while i < len(lines):
      line = lines[i]
      if not line.strip():
        break
      if line.startswith("\\"):
        break
      fields = line.split()
      if len(fields) not in (n + 1, n + 2) or (len(fields) == n + 2 and n == order):
        raise fail(i, f"a {n}-gram line needs a log10 probability, {n} words"
                   f"{' and an optional backoff' if n < order else ''}: {line[:80]!r}")
      try:
        lp = float(fields[0])
        bow = float(fields[n + 1]) if len(fields) == n + 2 else 0.0
      except ValueError:
        raise fail(i, f"not a number in {line[:80]!r}") from None
      if not lp <= 1e-6 or not math.isfinite(bow):
        raise fail(i, f"log10 probability must be <= 0 and the backoff finite: {line[:80]!r}")
      g = tuple(fields[1:n + 1])
      probs[g] = min(lp, 0.0) * _LN10
      if bow:
        backoffs[g] = bow * _LN10
      seen += 1
      i += 1
    if seen != expected[n]:
      raise fail(i - 1, f"\\data\\ says {expected[n]} {n}-grams but the section has {seen}")
  while i < len(lines) and not lines[i].strip():
    i += 1
  if i == len(lines) or lines[i].strip() != "\\end\\":
    got = lines[i].strip()[:60] if i < len(lines) else "end of file"
    raise fail(min(i, len(lines) - 1), f"expected \\end\\, found {got!r}")
  return NgramLM(order, probs, backoffs)


# ---- Beam search -----------------------------------------------------------------------------


class _Pieces:
  """Per CTC class: its word segments (the piece split at '▁') and a rolling hash of its text,
  so hypotheses are keyed by their whole text without keeping it."""

  def __init__(self, units: Any):
    sp = units.sp
    self.size = units.size + 1
    self.segments: list[tuple[str, ...] | None] = [None]  # class 0: blank
    self.mult, self.add = [1], [0]
    for i in range(units.size):
      special = sp.is_unknown(i) or sp.is_control(i) or sp.is_unused(i)
      piece = f"\x00{i}\x00" if special else sp.id_to_piece(i)  # never collides with letters
      self.segments.append(None if special else tuple(piece.split(_WORD_START)))
      m, a = 1, 0
      for ch in piece:
        m, a = m * _HASH_BASE % _HASH_MOD, (a * _HASH_BASE + ord(ch) + 1) % _HASH_MOD
      self.mult.append(m)
      self.add.append(a)


_HASH_MOD = (1 << 61) - 1
_HASH_BASE = 0x5BD1E995F00D
_PIECES: "weakref.WeakKeyDictionary[Any, _Pieces]" = weakref.WeakKeyDictionary()


def _pieces(units: Any) -> _Pieces:
  got = _PIECES.get(units)
  if got is None:
    got = _PIECES[units] = _Pieces(units)
  return got


class _Hyp:
  """A prefix: the hash of its text and its last label (together its identity), its labels
  and, with an LM, its finished words, the partial word, the LM state and score."""
  __slots__ = ("bonus", "ext", "key", "labels", "last", "lm", "partial", "state", "text_hash",
               "words")

  def __init__(self, text_hash: int, last: int, labels: tuple | None, state: tuple[str, ...],
               partial: str, words: tuple | None, lm: float, bonus: float):
    self.text_hash, self.last, self.key = text_hash, last, (text_hash, last)
    self.labels, self.words = labels, words  # linked lists (item, rest), newest first
    self.state, self.partial = state, partial
    self.lm, self.bonus = lm, bonus  # LM score of finished words; look-ahead of `partial`
    self.ext: dict[int, _Hyp | None] = {}  # extensions by one label, while in the beam


def _lae(a: float, b: float) -> float:
  """ln(e^a + e^b)."""
  if a < b:
    a, b = b, a
  if b == _NEG:
    return a
  return a + math.log1p(math.exp(b - a))


def frame_candidates(log_probs_TxC: np.ndarray, prune: float, top_k: int
                     ) -> list[list[tuple[int, float]]]:
  """Per frame, the classes worth extending with: the top_k best with log-prob above `prune`,
  and always the best one and the blank (so that every hypothesis can go on)."""
  lp = np.asarray(log_probs_TxC, np.float32)
  if lp.shape[0] == 0:
    return []
  k = max(1, min(top_k, lp.shape[1]))
  idx = np.argsort(-lp, axis=1, kind="stable")[:, :k]
  vals = np.take_along_axis(lp, idx, axis=1)
  keep = vals > prune
  keep[:, 0] = True
  out = []
  for ids, vs, ks, blank in zip(idx.tolist(), vals.tolist(), keep.tolist(), lp[:, 0].tolist()):
    row = [(i, v) for i, v, kk in zip(ids, vs, ks) if kk]
    if all(i != 0 for i, _ in row):
      row.append((0, blank))
    out.append(row)
  return out


def beam_search(log_probs_TxC: np.ndarray, units: Any, lm: NgramLM | None = None, *,
                beam: int = 32, alpha: float = 0.7, beta: float = 1.0, lexicon: bool = True,
                prune: float = -10.0, top_k: int = 8, beam_prune: float = 10.0) -> str:
  """The best transcript of one utterance by CTC prefix beam search.

  log_probs_TxC: float32 log-softmax CTC posteriors, class 0 blank, class i + 1 SentencePiece
  id i of `units` (a `sptlm.speech.units.Units`; classes beyond its size are never emitted).
  Hypotheses are texts (label paths to the same text are summed, whatever the pieces). With
  an LM, each word is scored when it ends (at a piece starting with '▁', and at the end, where
  </s> is scored too) by `alpha * ln p_lm(word | previous words) + beta`; while a word is
  unfinished the beam ranks it by `alpha *` the best unigram ln p of a word it can still
  become. With `lexicon` the partial word must be a prefix of a vocabulary word (only known
  words come out); without, unknown words score p(<unk>). Pieces may be letters or subwords.
  Per frame only the `top_k` best classes with log-prob above `prune` (and the blank) are
  tried, and at most `beam` hypotheses within `beam_prune` of the best are kept. Memory does
  not grow with the length of the input beyond the transcript itself.

  Defaults (alpha 0.7, beta 1.0, beam 32) are from a char-unit tokenizer on held-out
  Shakespeare (greedy WER 0.73 -> 0.39 with a 3-gram LM of the other sentences); alpha and
  beta are flat within about 0.5-1.0 and 0.5-1.5 there. Tune them on a dev set for a model.

  Without an LM the result is `units.text` of the best label sequence; with beam 1 that is
  the greedy path whenever each frame's best class has nearly all the mass (peaky
  posteriors; in general prefix search sums over alignments and can differ from the single
  best path).
  """
  lp = np.asarray(log_probs_TxC, np.float32)
  if lp.ndim != 2:
    raise ValueError(f"log-probs must be [T, C], got shape {lp.shape}")
  if lp.shape[0] == 0:
    return ""
  if beam < 1:
    raise ValueError(f"beam must be >= 1, not {beam}")
  pieces = _pieces(units)
  nvalid = min(pieces.size, lp.shape[1])
  segs_of, mult_of, add_of = pieces.segments, pieces.mult, pieces.add
  use_lm = lm is not None
  lex = lm.lexicon if use_lm else {}
  vocab = lm.vocab if use_lm else frozenset()
  lexicon = lexicon and use_lm
  unk_bonus = alpha * lm.unk_logprob if use_lm else 0.0

  def extend(h: _Hyp, c: int) -> _Hyp | None:
    if c >= nvalid:
      return None
    segs = segs_of[c]
    text_hash = (h.text_hash * mult_of[c] + add_of[c]) % _HASH_MOD
    if not use_lm:
      return _Hyp(text_hash, c, (c, h.labels), (), "", None, 0.0, 0.0)
    if segs is None:  # <unk>: no word can contain it
      return None
    partial, state, words, score = h.partial + segs[0], h.state, h.words, h.lm
    for seg in segs[1:]:  # each '▁' ends the word so far
      if partial:
        if lexicon and partial not in vocab:
          return None
        wlp, state = lm.score(state, partial)
        score += alpha * wlp + beta
        words = (partial, words)
      elif h.labels is not None:  # an empty word: '▁' twice, or a word start after only '▁'
        return None
      partial = seg
    if partial:
      best = lex.get(partial)
      if best is None:
        if lexicon:
          return None
        bonus = unk_bonus
      else:
        bonus = alpha * best
    else:
      bonus = 0.0
    return _Hyp(text_hash, c, (c, h.labels), state, partial, words, score, bonus)

  root = _Hyp(0, -1, None, lm.begin() if use_lm else (), "", None, 0.0, 0.0)
  beams: list[tuple[_Hyp, float, float]] = [(root, 0.0, _NEG)]  # (hyp, ln p_blank, ln p_label)
  for cands in frame_candidates(lp, prune, top_k):
    acc: dict[_Hyp, list[float]] = {}  # [ln p ending in blank, ln p ending in the last label]
    live = {h.key: h for h, _, _ in beams}  # one object per text and last label

    def add(h: _Hyp, ending: int, x: float) -> None:  # ending 0: in a blank, 1: in a label
      s = acc.get(h)
      if s is None:
        acc[h] = [x, _NEG] if ending == 0 else [_NEG, x]
      else:
        s[ending] = _lae(s[ending], x)

    for h, pb, pn in beams:
      total = _lae(pb, pn)
      for c, v in cands:
        if c == 0:
          add(h, 0, total + v)
          continue
        if c == h.last:
          if pn != _NEG:  # the label continues: same prefix
            add(h, 1, pn + v)
          if pb == _NEG:  # a new copy of the label needs a blank in between
            continue
          x = pb + v
        else:
          x = total + v
        e = h.ext.get(c, h)
        if e is h:
          e = h.ext[c] = extend(h, c)
        if e is None:
          continue
        add(live.setdefault(e.key, e), 1, x)
    ranked = [(_lae(pb, pn) + h.lm + h.bonus, h, pb, pn) for h, (pb, pn) in acc.items()]
    floor = max(r[0] for r in ranked) - beam_prune
    ranked = [r for r in ranked if r[0] >= floor]
    if len(ranked) > beam:
      ranked = heapq.nlargest(beam, ranked, key=_first)
    kept = {r[1] for r in ranked}
    for h, _, _ in beams:
      if h not in kept:
        h.ext = {}  # what it led to is unreachable now: let it go
    beams = [(h, pb, pn) for _, h, pb, pn in ranked]

  best_text, best_score = "", _NEG
  fallback_text, fallback_score = "", _NEG
  for h, pb, pn in beams:
    acoustic = _lae(pb, pn)
    if not use_lm:
      if acoustic > best_score:
        best_text, best_score = units.text(_unwind(h.labels)), acoustic
      continue
    state, words, score = h.state, h.words, acoustic + h.lm
    if h.partial:
      end_lp, _ = lm.score(state, EOS)
      drop = score + alpha * end_lp  # without the unfinished word (a lexicon fallback only)
      if drop > fallback_score:
        fallback_text, fallback_score = " ".join(_unwind(words)), drop
      if lexicon and h.partial not in vocab:
        continue
      wlp, state = lm.score(state, h.partial)
      score += alpha * wlp + beta
      words = (h.partial, words)
    end_lp, _ = lm.score(state, EOS)
    score += alpha * end_lp
    if score > best_score:
      best_text, best_score = " ".join(_unwind(words)), score
  if best_score == _NEG and fallback_score > _NEG:
    return fallback_text
  return best_text


def _first(x: tuple) -> float:
  return x[0]


def _unwind(items: tuple | None) -> list:
  """A linked list (newest, rest) -> its items, oldest first."""
  out = []
  while items is not None:
    out.append(items[0])
    items = items[1]
  return out[::-1]


def decode_batch(log_probs: Sequence[np.ndarray], units: Any, lm: NgramLM | None = None,
                 **kwargs: Any) -> list[str]:
  """`beam_search` of each utterance (kwargs: beam, alpha, beta, lexicon, prune, top_k)."""
  return [beam_search(lp, units, lm, **kwargs) for lp in log_probs]
