"""Mixture rates: token shares per task, turned into per-example sampling weights.

A task's `rate` is its share of the mixture's *tokens* (rates are normalised), which is how the
paper states its recipe. Sampling picks examples, so task i is drawn with probability
proportional to rate_i / tokens_per_example_i, using the mean example length measured when the
task was materialized (stats.json) or inspected.

The paper's pre-training mixture (../shared/docs/paper.md, "Pre-training recipe"), 1T tokens:
  text 30%; unsupervised speech about 31B tokens; supervised ASR + TTS about 11B speech + 3.5B
  text tokens; "the rest" synthetic interleaved (quoted as about 455B speech + 279B text).
The quoted parts do not add up to 1T (300 + 31 + 14.5 + 734 = 1,079.5B), so PAPER_MIXTURE
keeps what the paper fixes, text at 30% and the speech-only and supervised sizes, and gives
interleaved the rest (65.45%); ASR and TTS split the supervised 14.5B evenly (not published).
"""

from collections.abc import Mapping

# Token shares (percent of 1T tokens) of the paper's recipe, by task kind.
PAPER_MIXTURE: dict[str, float] = {
    "text": 30.0,
    "speech": 3.1,  # ~31B tokens of unsupervised speech
    "asr": 0.725,  # half of ~14.5B supervised tokens (the split is not published)
    "tts": 0.725,
    "interleaved": 65.45,  # the rest
}


def token_shares(rates: Mapping[str, float]) -> dict[str, float]:
  total = sum(rates.values())
  return {k: v / total for k, v in rates.items()}


def example_weights(rates: Mapping[str, float],
                    tokens_per_example: Mapping[str, float]) -> dict[str, float]:
  """Per-example sampling probabilities that give each task its token share."""
  missing = [k for k in rates if tokens_per_example.get(k, 0) <= 0]
  if missing:
    raise ValueError(f"no examples measured for task(s) {', '.join(missing)}")
  raw = {k: r / tokens_per_example[k] for k, r in rates.items()}
  total = sum(raw.values())
  return {k: v / total for k, v in raw.items()}
