"""Word error rate: word-level Levenshtein distance over reference words, summed over a set."""

from collections.abc import Sequence

import numpy as np


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
  """Substitutions + insertions + deletions turning `hyp` into `ref`."""
  prev = np.arange(len(hyp) + 1)
  for i, r in enumerate(ref, 1):
    cur = np.empty_like(prev)
    cur[0] = i
    for j, h in enumerate(hyp, 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
    prev = cur
  return int(prev[-1])


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """Corpus WER: total edits / total reference words (texts already normalized)."""
  if len(refs) != len(hyps):
    raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
  edits = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps))
  words = sum(len(r.split()) for r in refs)
  return edits / max(words, 1)


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """Corpus character error rate: total character edits / total reference characters."""
  if len(refs) != len(hyps):
    raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
  edits = sum(edit_distance(list(r), list(h)) for r, h in zip(refs, hyps))
  return edits / max(sum(len(r) for r in refs), 1)
