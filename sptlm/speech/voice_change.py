"""New voices from the corpus's own: Praat's "Change gender" (PSOLA) on training audio.

Four installable engines give the tokenizer about 15 voices beside espeak-ng's variants, and an
engine it never heard loses it about 25 CER points whichever engine that is (BENCHMARKS.md,
runs 5 and 6): what it lacks is breadth of voices. Praat (through PyPI's praat-parselmouth)
resynthesizes a clip with its formants scaled (a longer or shorter vocal tract), a new pitch
median, a flatter or livelier intonation and a new tempo, by pitch-synchronous overlap-add: a
different speaker, and a different vocoder signature, from every clip. Drawn per utterance
from its own generator (sptlm.speech.input), so the rest of the augmentation chain keeps its
draws; off unless data.augment.voice_prob > 0.
"""

import logging
import math
import threading

import numpy as np

from sptlm.config import ConfigError
from sptlm.speech.augment import AugmentConfig
from sptlm.speech.features import SAMPLE_RATE

log = logging.getLogger(__name__)
PITCH_FLOOR, PITCH_CEILING = 60.0, 600.0  # Hz: Praat's pitch analysis range for any voice
_PRAAT = threading.Lock()  # Praat's random state is global: seed and call under one lock
_KEPT = [0]  # clips drawn for a new voice that Praat could not change (kept as they were)


def kept_count() -> int:
  """How many clips drawn for a new voice this process kept in their own (Praat could not
  change them: too short, no voiced frame); the speech trainer reports it as voice_kept."""
  return _KEPT[0]


def _praat():
  try:
    import parselmouth
    from parselmouth.praat import call
  except ImportError as e:
    raise ConfigError("data.augment.voice_prob > 0 needs praat-parselmouth (pip install -e "
                      "'.[tts]'; scripts/setup.sh does it)") from e
  return parselmouth, call


def change_voice(samples: np.ndarray, *, formant_ratio: float, pitch_median_hz: float,
                 pitch_range: float, duration: float, seed: int = 0) -> np.ndarray:
  """Praat's Change gender: formants x `formant_ratio`, pitch median -> `pitch_median_hz`
  (0: keep), pitch excursions around it x `pitch_range`, length x `duration`; Praat's own
  randomness seeded with `seed`, so the same call gives the same samples. Raises
  parselmouth.PraatError where Praat cannot (e.g. no voiced frame at all)."""
  parselmouth, call = _praat()
  sound = parselmouth.Sound(np.asarray(samples, np.float64), sampling_frequency=SAMPLE_RATE)
  with _PRAAT:
    parselmouth.praat.run(f"random_initializeWithSeedUnsafelyButPredictably ({int(seed)})")
    out = call(sound, "Change gender", PITCH_FLOOR, PITCH_CEILING, formant_ratio,
               pitch_median_hz, pitch_range, duration)
  return np.asarray(out.values[0], np.float32)


def random_voice(samples: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, *,
                 min_samples: int = 0, max_samples: int | None = None) -> np.ndarray:
  """With probability cfg.voice_prob, the clip in a random new voice: formant ratio and pitch
  median log-uniform, pitch range and duration uniform in their ranges, the duration moved so
  the output stays within [min_samples, max_samples]; the peak level is kept. A clip Praat
  cannot change comes back as it was and is counted (kept_count)."""
  if not cfg.enabled or not cfg.voice_prob:
    return samples
  u, formant, pitch, spread, duration = rng.random(5)  # always the same draws: the stream
  seed = int(rng.integers(2**31 - 1))  # stays aligned whatever happens to this clip
  if u >= cfg.voice_prob:
    return samples
  x = np.asarray(samples, np.float32)
  n = len(x)
  hi = max_samples if max_samples is not None else 2 * n
  lo_d, hi_d = max(cfg.voice_duration_min, min_samples / max(n, 1)), min(cfg.voice_duration_max,
                                                                         hi / max(n, 1))
  if lo_d > hi_d or not np.any(x):
    return _kept(samples, "no room within the bucket" if np.any(x) else "silent")
  def log_uniform(t: float, a: float, b: float) -> float:
    return math.exp(math.log(a) + t * (math.log(b) - math.log(a)))
  parselmouth, _ = _praat()
  try:
    y = change_voice(
        x, formant_ratio=log_uniform(formant, cfg.voice_formant_min, cfg.voice_formant_max),
        pitch_median_hz=log_uniform(pitch, cfg.voice_pitch_min, cfg.voice_pitch_max),
        pitch_range=cfg.voice_range_min + spread * (cfg.voice_range_max - cfg.voice_range_min),
        duration=lo_d + duration * (hi_d - lo_d), seed=seed)
  except parselmouth.PraatError as e:  # too short for pitch analysis, no voiced frame
    return _kept(samples, str(e).splitlines()[0])
  y = y[:hi]
  if len(y) < min_samples:
    y = np.pad(y, (0, min_samples - len(y)))
  peak = float(np.abs(y).max())
  if not np.isfinite(peak) or peak == 0.0:
    return _kept(samples, "Praat returned silence")
  return (y * (float(np.abs(x).max()) / peak)).astype(np.float32)


def _kept(samples: np.ndarray, why: str) -> np.ndarray:
  with _PRAAT:
    _KEPT[0] += 1
    first = _KEPT[0] == 1
  (log.warning if first else log.debug)(
      "voice change: kept a clip in its own voice (%s); further ones are counted as voice_kept "
      "in metrics.jsonl", why)
  return samples
