"""A word n-gram language model for transcription: interpolated modified Kneser-Ney (as
KenLM's lmplz), trained from normalized sentences, saved and loaded as ARPA so a KenLM-built
model can replace it. `sptlm.speech.ctc_decode` scores each word a beam-search hypothesis
finishes with it.

  lm = NgramLM.train(normalized_sentences, order=3)
  lm.save_arpa("asr_lm.arpa"); lm = NgramLM.load_arpa("asr_lm.arpa")
"""

import gzip
import math
import pathlib
from collections import Counter
from collections.abc import Iterable, Sequence

from sptlm.errors import InputError

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
_SPECIAL = (BOS, EOS, UNK)
_LN10 = math.log(10.0)
_ARPA_MISSING_UNK_LOG10 = -100.0  # KenLM's probability for <unk> when a file lists none
_ARPA_BOS_LOG10 = -99.0  # <s> is never predicted: its ARPA probability is a placeholder
_FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback
_NEG = float("-inf")


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
      raise InputError("cannot train a language model on no words (asr.lm_text and the "
                       "corpus's lm_text.txt or training transcripts are empty)")

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
    is ignored; anything malformed raises InputError (a ValueError) naming the file and line."""
    p = pathlib.Path(path)
    try:
      raw = p.read_bytes()
      if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
      text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
      raise InputError(f"{p}: cannot read ARPA language model: {e}") from None
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
  def fail(i: int, msg: str) -> InputError:
    return InputError(f"{name}:{i + 1}: {msg} (not a valid ARPA language model)")

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
