"""Scores and intervals: a likelihood pair's score, accuracy and its 95% Wilson interval."""

import math
from collections.abc import Sequence


def pair_score(nll_right: float, nll_wrong: float) -> float:
  """1 when the right continuation is the likelier one (lower NLL), 0.5 on a tie, else 0."""
  if nll_right == nll_wrong:
    return 0.5
  return 1.0 if nll_right < nll_wrong else 0.0


def continuation_nll(token_nlls: Sequence[float], reduce: str = "mean") -> float:
  """A continuation's NLL from its per-token NLLs: the mean (default) or the sum."""
  if reduce not in ("mean", "sum"):
    raise ValueError(f"reduce={reduce!r}: use 'mean' or 'sum'")
  total = float(sum(token_nlls))
  return total / max(len(token_nlls), 1) if reduce == "mean" else total


def wilson(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
  """The Wilson score interval of a proportion (ties count half a success): 95% by default."""
  if n <= 0:
    return (0.0, 1.0)
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return (max(0.0, centre - half), min(1.0, centre + half))
