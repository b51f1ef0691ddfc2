"""Speech augmentation: each effect does what it says, the chain is seeded, and the input
pipeline augments training batches only when data.augment is enabled."""

import dataclasses
import pathlib

import numpy as np
import pytest

from sptlm.speech import augment
from sptlm.speech import config as config_lib
from sptlm.speech import input as input_lib
from sptlm.speech.augment import AugmentConfig
from sptlm.speech.manifest import Utterance
from sptlm.speech.features import SAMPLE_RATE, SAMPLES_PER_TOKEN, log_mel
from sptlm.speech.units import ctc_frames_needed

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "speech_tokenizer_tiny.py"
ALL_ON = AugmentConfig(enabled=True, speed_prob=1.0, noise_prob=1.0, reverb_prob=1.0,
                       telephone_prob=1.0, gain_prob=1.0, clip_prob=1.0)


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
  """Harmonics under a syllable-rate envelope, peak 0.5: a stand-in for speech."""
  rng = np.random.default_rng(seed)
  t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
  f0 = rng.uniform(100, 200)
  x = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6)) / k for k in range(1, 20))
  x *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
  return (0.5 * x / np.abs(x).max()).astype(np.float32)


def _db(p: float) -> float:
  return 10 * np.log10(p)


# ---- Effects ---------------------------------------------------------------------------------


@pytest.mark.parametrize("color", augment.NOISE_COLORS)
@pytest.mark.parametrize("snr_db", [0.0, 10.0, 25.0])
def test_noise_hits_the_target_snr(color: str, snr_db: float) -> None:
  x = _speechlike(1.0)
  y = augment.add_noise(x, snr_db, color, np.random.default_rng(1))
  noise = y.astype(np.float64) - x
  measured = _db(np.mean(x.astype(np.float64) ** 2) / np.mean(noise ** 2))
  assert abs(measured - snr_db) < 0.1
  assert y.dtype == np.float32 and y.shape == x.shape


def test_noise_colors_have_their_spectral_slopes() -> None:
  """Power per octave: flat-spectrum noise gains 3 dB an octave, pink 0, brown loses 3."""
  rng = np.random.default_rng(0)
  for color, slope in (("white", 3.0), ("pink", 0.0), ("brown", -3.0)):
    n = augment.colored_noise(2 ** 16, color, rng)
    p = np.abs(np.fft.rfft(n)) ** 2
    f = np.fft.rfftfreq(len(n), 1 / SAMPLE_RATE)
    bands = [_db(p[(f >= lo) & (f < 2 * lo)].sum()) for lo in (250, 500, 1000, 2000)]
    assert np.allclose(np.diff(bands), slope, atol=1.0), (color, bands)


def test_silence_stays_silent_under_noise() -> None:
  x = np.zeros(1600, np.float32)
  assert np.array_equal(augment.add_noise(x, 10.0, "white", np.random.default_rng(0)), x)


@pytest.mark.parametrize("factor", [0.9, 0.95, 1.0, 1.05, 1.1])
def test_speed_changes_length_by_the_factor(factor: float) -> None:
  x = _speechlike(2.0)
  y = augment.speed(x, factor)
  assert len(y) == int(np.ceil(len(x) / factor))
  assert y.dtype == np.float32


def test_speed_moves_the_pitch_with_it() -> None:
  t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
  x = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
  y = augment.speed(x, 1.1)
  f = np.fft.rfftfreq(len(y), 1 / SAMPLE_RATE)
  assert abs(f[np.argmax(np.abs(np.fft.rfft(y)))] - 1100) < 2


def test_telephone_removes_the_upper_band() -> None:
  x = np.random.default_rng(0).uniform(-0.5, 0.5, SAMPLE_RATE).astype(np.float32)  # white
  y = augment.telephone(x)
  p = np.abs(np.fft.rfft(y)) ** 2
  f = np.fft.rfftfreq(len(y), 1 / SAMPLE_RATE)
  assert len(y) == len(x)
  assert p[f > 4000].sum() / p.sum() < 0.01
  assert p[f < 200].sum() / p.sum() < 0.01
  assert p[(f > 500) & (f < 3000)].sum() / p.sum() > 0.8


def _schroeder_rt60(h: np.ndarray) -> float:
  """T20 x 3 from the backward-integrated energy decay curve (ISO 3382)."""
  edc = _db(np.cumsum((h ** 2)[::-1])[::-1] / np.sum(h ** 2))
  t = np.arange(len(h)) / SAMPLE_RATE
  fit = (edc <= -5) & (edc >= -25)
  slope = np.polyfit(t[fit], edc[fit], 1)[0]
  return -60 / slope


@pytest.mark.parametrize("rt60", [0.3, 0.6])
def test_reverb_impulse_response_decays_at_rt60(rt60: float) -> None:
  h = augment.room_impulse_response(rt60, np.random.default_rng(0))
  assert np.isclose(np.sum(h ** 2), 1.0)
  assert abs(_schroeder_rt60(h) - rt60) < 0.15 * rt60


def test_reverb_fills_the_silence_after_a_burst() -> None:
  x = np.zeros(SAMPLE_RATE, np.float32)
  x[:4000] = np.random.default_rng(0).uniform(-0.5, 0.5, 4000)
  y = augment.reverb(x, 0.5, 0.5, np.random.default_rng(1))
  assert len(y) == len(x) and y.dtype == np.float32
  tail = [_db(np.mean(y[s:s + 800] ** 2)) for s in (4000, 5600, 7200, 8800)]
  assert np.all(np.diff(tail) < 0) and tail[0] > -40  # a tail where x is silent, decaying


@pytest.mark.parametrize("db", [-12.0, -3.5, 0.0, 6.0])
def test_gain_in_db_is_exact(db: float) -> None:
  x = _speechlike(0.5)
  y = augment.gain(x, db)
  ratio = 20 * np.log10(np.sqrt(np.mean(y.astype(np.float64) ** 2) /
                                np.mean(x.astype(np.float64) ** 2)))
  assert abs(ratio - db) < 1e-4


def test_clipping_bounds_the_waveform() -> None:
  x = _speechlike(0.5)
  y = augment.clip(x, 0.3)
  assert np.abs(y).max() == np.float32(0.3)
  inside = np.abs(x) < 0.3
  assert np.array_equal(y[inside], x[inside])  # only the peaks change


# ---- The chain -------------------------------------------------------------------------------


def test_off_by_default_is_the_identity() -> None:
  x = _speechlike(1.0)
  assert AugmentConfig().enabled is False
  assert augment.augment(x, AugmentConfig(), np.random.default_rng(0)) is x
  zero = dataclasses.replace(ALL_ON, speed_prob=0.0, noise_prob=0.0, reverb_prob=0.0,
                             telephone_prob=0.0, gain_prob=0.0, clip_prob=0.0)
  assert np.array_equal(augment.augment(x, zero, np.random.default_rng(0)), x)


def test_chain_is_deterministic_per_seed() -> None:
  x = _speechlike(1.5)
  cfg = AugmentConfig(enabled=True)
  outs = {}
  for seed in range(6):
    a = augment.augment(x, cfg, np.random.default_rng([seed, 0, 7]))
    b = augment.augment(x, cfg, np.random.default_rng([seed, 0, 7]))
    assert a.tobytes() == b.tobytes()  # bit-identical
    assert a.dtype == np.float32 and np.abs(a).max() <= 1.0
    outs[seed] = a.tobytes()
  assert len(set(outs.values())) == len(outs)  # every seed differs
  full = augment.augment(x, ALL_ON, np.random.default_rng(3))
  assert not np.array_equal(full[:len(x)], x[:len(full)])


def test_speed_stays_within_the_length_bounds() -> None:
  x = _speechlike(2.0)
  cfg = dataclasses.replace(ALL_ON, noise_prob=0.0, reverb_prob=0.0, telephone_prob=0.0,
                            gain_prob=0.0, clip_prob=0.0, speed_min=0.8, speed_max=1.2)
  lengths = {len(augment.augment(x, cfg, np.random.default_rng(s), min_samples=len(x) - 800,
                                 max_samples=len(x) + 800)) for s in range(20)}
  assert all(len(x) - 800 <= n <= len(x) + 800 for n in lengths) and len(lengths) > 1
  tight = augment.augment(x, cfg, np.random.default_rng(0), min_samples=len(x) + 5,
                          max_samples=len(x) + 6)  # no factor on the grid fits: unchanged
  assert np.array_equal(tight, x)


# ---- Feature effects (VTLP warp, SpecAugment masks) ------------------------------------------


def _tone(hz: float, seconds: float = 0.5) -> np.ndarray:
  t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
  return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.mark.parametrize("factor", [0.9, 1.12])
def test_warp_moves_a_tone_as_the_factor_says(factor: float) -> None:
  """A 1 kHz tone warped by `factor` peaks in the bin of a (factor x 1 kHz) tone."""
  warped = augment.warp_frequency(log_mel(_tone(1000.0), 128), factor)
  target = log_mel(_tone(1000.0 * factor), 128)
  assert abs(int(warped.mean(0).argmax()) - int(target.mean(0).argmax())) <= 1
  assert int(warped.mean(0).argmax()) != int(log_mel(_tone(1000.0), 128).mean(0).argmax())


def test_warp_by_one_is_the_identity_and_keeps_the_band_edges() -> None:
  mel = log_mel(_speechlike(0.5), 64)
  np.testing.assert_allclose(augment.warp_frequency(mel, 1.0), mel, atol=1e-6)
  nyquist = SAMPLE_RATE / 2
  for factor in (0.85, 1.15):
    f = np.linspace(0, nyquist, 1001)
    src = augment.vtlp_source_hz(f, factor)
    assert src[0] == 0.0 and src[-1] == pytest.approx(nyquist)
    assert np.all(np.diff(src) > 0)  # monotone: no band folds over another


def test_equalizer_adds_its_gain_curve_in_db_and_keeps_silence() -> None:
  loud, quiet = log_mel(_tone(1000.0), 64), log_mel(np.zeros(8000, np.float32), 64)
  curve = np.array([6.0, 6.0, 6.0, 6.0, 6.0])  # flat +6 dB: the features of a 2x louder tone
  np.testing.assert_allclose(augment.equalize(loud, curve)[loud > -0.9],
                             log_mel(2 * _tone(1000.0), 64)[loud > -0.9], atol=2e-3)
  assert np.array_equal(augment.equalize(quiet, curve), quiet)  # the floor stays the floor
  tilt = augment.equalize(loud, np.array([-6.0, -3.0, 0.0, 3.0, 6.0]))
  d = (tilt - loud)[loud > -0.9 + 0.15].reshape(-1)
  assert d.min() >= -6 / 40 - 1e-6 and d.max() <= 6 / 40 + 1e-6


def test_masks_hold_the_mean_stay_inside_the_audio_and_are_seeded() -> None:
  mel = log_mel(_speechlike(2.0), 64)  # 200 frames
  padded = np.concatenate([mel, np.zeros((40, 64), np.float32)])  # padding after the audio
  cfg = AugmentConfig(enabled=True, freq_masks=2, freq_mask_bins=10, time_masks=2,
                      time_mask_frames=30, time_mask_ratio=0.1)
  seen_f = seen_t = 0
  for seed in range(20):
    out = augment.augment_features(padded, 200, cfg, np.random.default_rng(seed))
    again = augment.augment_features(padded, 200, cfg, np.random.default_rng(seed))
    assert out.tobytes() == again.tobytes()
    assert np.array_equal(out[200:], padded[200:])  # padding untouched
    changed = out[:200] != mel
    rows, cols = changed.all(1), changed.all(0)  # whole masked frames / whole masked bins
    value = float(mel.mean())
    assert np.all(out[:200][rows] == np.float32(value))
    assert np.all(out[:200][:, cols] == np.float32(value))
    assert cols.sum() <= 2 * 10 and rows.sum() <= 2 * 20  # 20 = 10% of 200 frames < 30
    assert np.all(changed == (rows[:, None] | cols[None, :]))  # nothing else changes
    seen_f, seen_t = seen_f + cols.any(), seen_t + rows.any()
  assert seen_f > 10 and seen_t > 10
  assert augment.augment_features(padded, 200, AugmentConfig(enabled=True),
                                  np.random.default_rng(0)) is padded  # off unless set


# ---- Config and input pipeline ---------------------------------------------------------------


def test_config_section_defaults_off_and_overrides() -> None:
  assert config_lib.load(CONFIG).data.augment == AugmentConfig()
  cfg = config_lib.load(CONFIG, ["--config.data.augment.enabled=True",
                                 "--config.data.augment.speed_prob=1",
                                 "--config.data.augment.noise_colors=('pink',)"])
  assert cfg.data.augment.enabled and cfg.data.augment.speed_prob == 1.0
  assert cfg.data.augment.noise_colors == ("pink",)
  assert config_lib.from_json(config_lib.to_json(cfg)) == cfg


@pytest.mark.parametrize("override, message", [
    ("data.augment.noise_prob=1.5", "data.augment.noise_prob=1.5 must be within 0..1"),
    ("data.augment.speed_min=1.2", "data.augment.speed_min=1.2 must be at most "
                                   "data.augment.speed_max=1.1"),
    ("data.augment.noise_colors=('blue',)", "data.augment.noise_colors='blue' is not one of"),
    ("data.augment.clip_level_min=0", "data.augment.clip_level_min=0.0 must be above 0"),
    ("data.augment.reverb_wet_max=2", "data.augment.reverb_wet_max=2.0 and"),
    ("data.augment.loudness=1", "unknown config key 'data.augment.loudness'"),
    ("data.augment.warp_prob=2", "data.augment.warp_prob=2.0 must be within 0..1"),
    ("data.augment.warp_min=1.2", "data.augment.warp_min=1.2 must be at most "
                                  "data.augment.warp_max=1.1"),
    ("data.augment.eq_prob=-0.1", "data.augment.eq_prob=-0.1 must be within 0..1"),
    ("data.augment.freq_masks=-1", "data.augment.freq_masks=-1 must be at least 0"),
    ("data.augment.time_mask_ratio=1.5", "data.augment.time_mask_ratio=1.5 must be within 0..1"),
])
def test_config_rejects_bad_values(override: str, message: str) -> None:
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.load(CONFIG, [f"--config.{override}"])
  assert str(info.value).startswith(message), str(info.value)


class _Source:
  """Audio by utterance id: the part of a ManifestSource the loader uses."""

  def __init__(self, audios: dict[str, np.ndarray]):
    self.audios = audios

  def load(self, utt: Utterance) -> np.ndarray:
    return self.audios[utt.id]


def _pipeline() -> tuple[_Source, input_lib.Prepared, list[tuple[int, int]]]:
  rng = np.random.default_rng(0)
  utts, audios, tokens, labels = [], {}, [], []
  for k in range(16):
    n = int(rng.integers(8, 20))  # tokens: fits the 1.6 s (20-token) bucket
    x = _speechlike(n * SAMPLES_PER_TOKEN / SAMPLE_RATE, seed=k)
    utts.append(Utterance(str(k), f"{k}.wav", "text", "train"))
    audios[str(k)] = x
    tokens.append(input_lib.num_tokens(len(x)))
    labels.append(rng.integers(1, 30, int(rng.integers(3, 12))).astype(np.int32))
  data = input_lib.Prepared(utts, np.asarray(tokens), labels, 0, 0)
  return _Source(audios), data, input_lib.bucket_shapes((1.6,), 6.4, 1)


def _batches(augment_cfg: AugmentConfig | None, steps: int = 3) -> list[dict[str, np.ndarray]]:
  source, data, shapes = _pipeline()
  kwargs = {} if augment_cfg is None else {"augment": augment_cfg}
  it = input_lib.train_iterator(source, data, shapes, steps=steps, seed=5, num_mels=16,
                                ctc_upsample=4, **kwargs)
  return [next(it) for _ in range(steps)]


def _equal(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
  return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
             for x, y in zip(a, b, strict=True))


def test_pipeline_default_is_unchanged_and_augmented_batches_are_seeded() -> None:
  plain = _batches(None)
  assert _equal(plain, _batches(AugmentConfig()))  # the section's defaults: no change at all
  assert _equal(plain, _batches(dataclasses.replace(ALL_ON, enabled=False)))
  # without the keyword, batches are the original loader's: make_batch of the raw audio
  source, data, shapes = _pipeline()
  plan = input_lib.plan_batches(data.tokens, shapes, seed=5, epochs=1)
  bucket, members = plan[0]
  n = shapes[bucket][1]
  first = input_lib.make_batch([source.load(data.utts[i]) for i in members],
                               [data.labels[i] for i in members], n, 16, n * 4)
  assert _equal(plain[:1], [first])

  cfg = AugmentConfig(enabled=True)
  on, again = _batches(cfg), _batches(cfg)
  assert _equal(on, again)  # same seed: bit-identical batches
  assert not any(np.array_equal(p["mel"], a["mel"]) for p, a in zip(plain, on))
  for p, a in zip(plain, on):  # supervision untouched; speed keeps audio in its bucket
    assert np.array_equal(p["labels"], a["labels"])
    assert np.array_equal(p["label_paddings"], a["label_paddings"])
    needed = [ctc_frames_needed(y[pad == 0]) for y, pad in zip(a["labels"], a["label_paddings"])]
    assert np.all(a["valid"].sum(1) * 4 >= needed)


def test_feature_effects_leave_the_audio_chain_as_it_was() -> None:
  """Masks draw from their own stream: outside the masked cells, the batches are exactly those
  of the audio chain alone; a resumed run sees the same masks."""
  audio_only = AugmentConfig(enabled=True)
  masked = dataclasses.replace(audio_only, freq_masks=1, freq_mask_bins=4, time_masks=1,
                               time_mask_frames=10, time_mask_ratio=0.2)
  base, on = _batches(audio_only), _batches(masked)
  assert _equal(on, _batches(masked))
  differ = 0
  for b, m in zip(base, on):
    for r in range(len(b["mel"])):
      changed = b["mel"][r] != m["mel"][r]
      if changed.any():  # every changed cell holds the one mask value of its utterance
        assert np.unique(m["mel"][r][changed]).size == 1
        differ += 1
    assert np.array_equal(b["labels"], m["labels"]) and np.array_equal(b["valid"], m["valid"])
  assert differ > 0
  warped = _batches(dataclasses.replace(audio_only, warp_prob=1.0, warp_min=1.1, warp_max=1.1))
  assert not any(np.array_equal(b["mel"], w["mel"]) for b, w in zip(base, warped))


def test_augmented_pipeline_resumes_exactly() -> None:
  """The grain state saved with a checkpoint brings back the same augmented audio."""
  source, data, shapes = _pipeline()
  kwargs = dict(steps=3, seed=5, num_mels=16, ctc_upsample=4, augment=AugmentConfig(enabled=True))
  it = input_lib.train_iterator(source, data, shapes, **kwargs)
  next(it)
  state = it.get_state()
  expected = next(it)
  resumed = input_lib.train_iterator(source, data, shapes, **kwargs)
  resumed.set_state(state)
  assert _equal([next(resumed)], [expected])


def test_eval_audio_is_never_augmented() -> None:
  """Only train_iterator takes data.augment: the eval path (source.load + make_batch, or the
  tokenizer's encode) has no way to receive it, whatever the config says."""
  import inspect

  cfg = config_lib.load(CONFIG, ["--config.data.augment.enabled=True"])
  assert cfg.data.augment.enabled
  assert "augment" in inspect.signature(input_lib.train_iterator).parameters
  for fn in (input_lib.make_batch, input_lib.prepare):
    assert "augment" not in inspect.signature(fn).parameters


def test_robust_configs_load_and_differ_only_in_feature_effects_and_steps() -> None:
  configs = CONFIG.parent
  audio = config_lib.load(configs / "speech_tokenizer_robust.py")
  feats = config_lib.load(configs / "speech_tokenizer_robust_features.py")
  assert audio.data.augment == AugmentConfig(enabled=True)
  assert not augment.features_enabled(audio.data.augment)
  assert augment.features_enabled(feats.data.augment)
  audio_part = {k: v for k, v in dataclasses.asdict(feats.data.augment).items()
                if k in dataclasses.asdict(AugmentConfig(enabled=True))
                and not k.startswith(("warp", "eq", "freq_mask", "time_mask"))}
  assert audio_part == {k: v for k, v in dataclasses.asdict(audio.data.augment).items()
                        if k in audio_part}
  assert (feats.model, feats.vq, feats.asr) == (audio.model, audio.vq, audio.asr)
  assert feats.train.steps == 2 * audio.train.steps


def test_small_config_is_the_robust_recipe_with_a_bigger_model() -> None:
  configs = CONFIG.parent
  robust = config_lib.load(configs / "speech_tokenizer_robust.py")
  small = config_lib.load(configs / "speech_tokenizer_small.py")
  assert (small.data, small.vq, small.asr) == (robust.data, robust.vq, robust.asr)
  assert small.model.d_model > robust.model.d_model
  assert small.model.layers_before_vq > robust.model.layers_before_vq
  assert small.model.layers_after_vq > robust.model.layers_after_vq
  assert small.model.d_model % small.model.num_heads == 0
