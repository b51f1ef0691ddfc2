"""Voice change (data.augment.voice_*): Praat's Change gender gives each training clip a new
speaker, formants, pitch and tempo as asked, seeded, inside the caller's length bounds."""

import dataclasses

import numpy as np
import parselmouth
import pytest

from sptlm.speech import input as input_lib
from sptlm.speech import voice_change
from sptlm.speech.augment import AugmentConfig
from sptlm.speech.config import ConfigError, validate_augment
from sptlm.speech.features import SAMPLE_RATE

from test_speech_augment import _batches, _equal  # noqa: E402  (tests/ is on sys.path)

ON = AugmentConfig(enabled=True, speed_prob=0.0, noise_prob=0.0, reverb_prob=0.0,
                   telephone_prob=0.0, gain_prob=0.0, clip_prob=0.0, voice_prob=1.0)


def _vowel(seconds: float = 1.5, f0: float = 120.0, formants=(700.0, 1200.0, 2600.0)):
  """A glottal pulse train (with a little vibrato) through three formant resonators."""
  import scipy.signal
  n = round(seconds * SAMPLE_RATE)
  t = np.arange(n) / SAMPLE_RATE
  phase = np.cumsum(f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))) / SAMPLE_RATE
  x = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
  for f, bw in zip(formants, (80.0, 100.0, 150.0)):
    r = np.exp(-np.pi * bw / SAMPLE_RATE)
    x = scipy.signal.lfilter([1.0], [1.0, -2 * r * np.cos(2 * np.pi * f / SAMPLE_RATE), r * r], x)
  return (0.5 * x / np.abs(x).max()).astype(np.float32)


def _pitch_median(x: np.ndarray) -> float:
  f0 = parselmouth.Sound(x.astype(np.float64), SAMPLE_RATE).to_pitch().selected_array["frequency"]
  return float(np.median(f0[f0 > 0]))


def _formant(x: np.ndarray, k: int) -> float:
  formant = parselmouth.Sound(x.astype(np.float64), SAMPLE_RATE).to_formant_burg(
      max_number_of_formants=4, maximum_formant=4000)
  times = np.linspace(0.3, len(x) / SAMPLE_RATE - 0.3, 20)
  return float(np.nanmedian([formant.get_value_at_time(k, t) for t in times]))


@pytest.mark.parametrize("target", [90.0, 200.0])
def test_pitch_median_lands_where_asked_and_the_length_scales(target):
  x = _vowel()
  assert _pitch_median(x) == pytest.approx(120.0, rel=0.03)
  y = voice_change.change_voice(x, formant_ratio=1.0, pitch_median_hz=target, pitch_range=1.0,
                                duration=1.2)
  assert _pitch_median(y) == pytest.approx(target, rel=0.05)
  assert len(y) == pytest.approx(1.2 * len(x), rel=0.01)


def test_formants_move_by_the_ratio():
  x = _vowel()
  y = voice_change.change_voice(x, formant_ratio=1.15, pitch_median_hz=0.0, pitch_range=1.0,
                                duration=1.0)
  for k, f in ((1, 700.0), (2, 1200.0)):
    assert _formant(x, k) == pytest.approx(f, rel=0.08)
    assert _formant(y, k) / _formant(x, k) == pytest.approx(1.15, rel=0.06)
  assert _pitch_median(y) == pytest.approx(120.0, rel=0.05)  # median 0: the pitch stays


def test_random_voice_is_seeded_bounded_and_off_by_default():
  x = _vowel(1.0)
  assert voice_change.random_voice(x, AugmentConfig(enabled=True), np.random.default_rng(0)) is x
  a = voice_change.random_voice(x, ON, np.random.default_rng(3), min_samples=15000,
                                max_samples=16500)
  b = voice_change.random_voice(x, ON, np.random.default_rng(3), min_samples=15000,
                                max_samples=16500)
  assert np.array_equal(a, b) and not np.array_equal(a, x)
  assert 15000 <= len(a) <= 16500
  assert np.abs(a).max() == pytest.approx(np.abs(x).max(), rel=1e-5)  # the level is kept
  others = {round(_pitch_median(voice_change.random_voice(x, ON, np.random.default_rng(s))))
            for s in range(4)}
  assert len(others) == 4 and all(70 < p < 290 for p in others)
  silent = np.zeros(8000, np.float32)
  assert voice_change.random_voice(silent, ON, np.random.default_rng(0)) is silent


def test_pipeline_voices_are_seeded_and_leave_the_other_draws_alone():
  plain = _batches(AugmentConfig(enabled=True))
  voiced = _batches(dataclasses.replace(AugmentConfig(enabled=True), voice_prob=1.0))
  assert _equal(voiced, _batches(dataclasses.replace(AugmentConfig(enabled=True),
                                                     voice_prob=1.0)))
  for p, v in zip(plain, voiced):
    assert np.array_equal(p["labels"], v["labels"]) and not np.array_equal(p["mel"], v["mel"])
    needed = [input_lib.ctc_frames_needed(y[pad == 0])
              for y, pad in zip(v["labels"], v["label_paddings"])]
    assert np.all(v["valid"].sum(1) * 4 >= needed)


@pytest.mark.parametrize("change,match", [
    (dict(voice_prob=1.5), "voice_prob"),
    (dict(voice_formant_min=1.3), "voice_formant_min"),
    (dict(voice_pitch_min=0.0, voice_pitch_max=100.0), "voice_pitch_min"),
    (dict(voice_range_min=-0.1), "voice_range_min"),
])
def test_config_errors_name_the_key(change, match):
  with pytest.raises(ConfigError, match=match):
    validate_augment(dataclasses.replace(AugmentConfig(), **change))


def test_clips_praat_cannot_change_are_kept_and_counted(monkeypatch, caplog):
  short = _vowel(0.01)  # 160 samples: too short for a 60 Hz pitch analysis
  before = voice_change.kept_count()
  assert voice_change.random_voice(short, ON, np.random.default_rng(0)) is short
  assert voice_change.kept_count() == before + 1
  def broken(*args, **kwargs):
    raise ValueError("a bug, not a clip Praat cannot change")
  monkeypatch.setattr(voice_change, "change_voice", broken)
  with pytest.raises(ValueError, match="a bug"):  # only Praat's own refusals are absorbed
    voice_change.random_voice(_vowel(1.0), ON, np.random.default_rng(0))
