"""Training-audio augmentation for a tokenizer that holds up off the clean synthetic corpus.

Pure numpy/scipy effects on 16 kHz mono float32 waveforms in [-1, 1] (sptlm.speech.audio's
convention): speed perturbation, additive white/pink/brown noise at an SNR, a synthetic room
reverb, telephone band-limiting, gain and hard clipping. `augment` applies a random chain of
them, drawn from a numpy Generator: the caller seeds one per utterance (sptlm.speech.input keys
it by seed, batch and utterance), so a resumed run sees bit-identical audio. Evaluation never
calls it.

`augment_features` then works on the log-mel features, with a generator of its own (so turning
it on leaves the audio chain's draws as they were): a vocal-tract-length warp of the frequency
axis (VTLP, Jaitly & Hinton 2013: formants move without the tempo, a voice the corpus never
had), a random smooth equalizer (a spectral tilt and colour no engine of the corpus has) and
SpecAugment's frequency and time masks (Park et al. 2019: no single band or instant
can carry a word, so the codes cannot lean on one synthesizer's spectral quirks).
"""

import dataclasses
import math

import numpy as np
import scipy.signal

from sptlm.speech import features
from sptlm.speech.audio import resample
from sptlm.speech.features import SAMPLE_RATE

NOISE_COLORS = ("white", "pink", "brown")  # power spectrum flat, 1/f, 1/f^2
SPEED_RATE_STEP = 100  # Hz: speed factors are rounded so resampling stays a short polyphase filter
TELEPHONE_BAND = (300.0, 3400.0)  # Hz: the narrowband telephone channel
TELEPHONE_RATE = 8_000
DECAY_60DB = 3 * math.log(10)  # amplitude exponent at which energy has fallen 60 dB


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """`data.augment`: each effect is applied with its probability, its parameter drawn
  uniformly from its [min, max] range; nothing happens unless `enabled`."""

  enabled: bool = False
  # moonshine_tiny_mel only: the chain reaches the log-mel stem's audio alone; Moonshine's
  # features stay the clean audio's, so they still come from the feature cache (the slow
  # encoder is not run again each epoch) while the mel stem learns to read noisy audio. Effects
  # that change the length (speed, voice) must be off: both stems share one time axis.
  mel_only: bool = False
  speed_prob: float = 0.5
  speed_min: float = 0.9  # < 1: slower and longer (and lower pitched), as sox `speed`
  speed_max: float = 1.1
  noise_prob: float = 0.5
  noise_snr_db_min: float = 5.0
  noise_snr_db_max: float = 30.0
  noise_colors: tuple[str, ...] = NOISE_COLORS  # one drawn uniformly per noisy utterance
  reverb_prob: float = 0.3
  reverb_rt60_min: float = 0.2  # seconds for the reverberant tail to fall 60 dB
  reverb_rt60_max: float = 0.8
  reverb_wet_min: float = 0.2  # share of the reverberant signal in the dry/wet mix
  reverb_wet_max: float = 0.6
  telephone_prob: float = 0.1
  gain_prob: float = 0.5
  gain_db_min: float = -12.0
  gain_db_max: float = 6.0
  clip_prob: float = 0.1
  clip_level_min: float = 0.25  # absolute level, after the gain (so loud gains clip more)
  clip_level_max: float = 0.9
  # on the log-mel features (`augment_features`); all off unless set (the robust config does)
  warp_prob: float = 0.0  # vocal tract length perturbation of the frequency axis
  warp_min: float = 0.9  # > 1 moves formants up (a shorter vocal tract)
  warp_max: float = 1.1
  eq_prob: float = 0.0  # a random smooth equalizer: another microphone, another vocoder
  eq_db: float = 6.0  # its gain curve stays within +-eq_db
  freq_masks: int = 0  # SpecAugment frequency masks per utterance
  freq_mask_bins: int = 0  # each up to this many mel bins wide
  time_masks: int = 0  # SpecAugment time masks per utterance
  time_mask_frames: int = 0  # each up to this many 10 ms frames long...
  time_mask_ratio: float = 0.05  # ...and up to this share of the utterance
  # a new voice by Praat's Change gender before the chain (sptlm.speech.voice_change); off unless
  # voice_prob > 0
  voice_prob: float = 0.0
  voice_formant_min: float = 0.85  # formant ratio, log-uniform: > 1 a shorter vocal tract
  voice_formant_max: float = 1.2
  voice_pitch_min: float = 80.0  # new pitch median (Hz), log-uniform
  voice_pitch_max: float = 260.0
  voice_range_min: float = 0.5  # pitch excursions around the median: < 1 flatter intonation
  voice_range_max: float = 1.8
  voice_duration_min: float = 0.85  # length factor (> 1 slower), pitch kept
  voice_duration_max: float = 1.15


# ---- Effects ---------------------------------------------------------------------------------


def speed_rate(factor: float) -> int:
  """The source rate whose resampling to 16 kHz plays the audio `factor` times as fast."""
  return max(SPEED_RATE_STEP, round(SAMPLE_RATE * factor / SPEED_RATE_STEP) * SPEED_RATE_STEP)


def speed(x: np.ndarray, factor: float) -> np.ndarray:
  """Plays `x` `factor` times as fast (pitch moves with it): ceil(len / factor) samples, with
  factor rounded to a multiple of SPEED_RATE_STEP / 16 kHz."""
  return resample(x, speed_rate(factor))


def colored_noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
  """`n` samples of zero-mean noise with a white, pink (1/f) or brown (1/f^2) power spectrum."""
  white = rng.standard_normal(n)
  if color == "white":
    return white
  exponent = {"pink": 0.5, "brown": 1.0}[color]  # amplitude ~ f^-exponent
  spec = np.fft.rfft(white)
  f = np.fft.rfftfreq(n)
  spec[1:] /= f[1:] ** exponent
  spec[0] = 0.0
  return np.fft.irfft(spec, n)


def add_noise(x: np.ndarray, snr_db: float, color: str, rng: np.random.Generator) -> np.ndarray:
  """x + noise scaled so that 10 log10(P_x / P_noise) is exactly `snr_db`; silence stays."""
  xd = x.astype(np.float64)
  p_signal = np.mean(xd ** 2)
  if p_signal == 0.0:
    return x
  noise = colored_noise(len(x), color, rng)
  noise *= math.sqrt(p_signal / (np.mean(noise ** 2) * 10 ** (snr_db / 10)))
  return (xd + noise).astype(np.float32)


def room_impulse_response(rt60: float, rng: np.random.Generator) -> np.ndarray:
  """Exponentially decaying Gaussian noise, 60 dB down at `rt60` s, with unit energy."""
  t = np.arange(max(1, round(rt60 * SAMPLE_RATE))) / SAMPLE_RATE
  h = rng.standard_normal(len(t)) * np.exp(-DECAY_60DB * t / rt60)
  return h / np.sqrt(np.sum(h ** 2))


def reverb(x: np.ndarray, rt60: float, wet: float, rng: np.random.Generator) -> np.ndarray:
  """(1 - wet) x + wet (x * h): the same length, so the tail past the end is cut."""
  y = scipy.signal.fftconvolve(x.astype(np.float64), room_impulse_response(rt60, rng))[:len(x)]
  return ((1.0 - wet) * x + wet * y).astype(np.float32)


def telephone(x: np.ndarray) -> np.ndarray:
  """300-3400 Hz band-pass (zero phase, so nothing shifts) and a round trip through 8 kHz."""
  sos = scipy.signal.butter(6, TELEPHONE_BAND, btype="bandpass", fs=SAMPLE_RATE, output="sos")
  y = scipy.signal.sosfiltfilt(sos, x.astype(np.float64))
  narrow = resample(y, SAMPLE_RATE, TELEPHONE_RATE)
  return resample(narrow, TELEPHONE_RATE)[:len(x)]


def gain(x: np.ndarray, db: float) -> np.ndarray:
  return (x * np.float32(10 ** (db / 20))).astype(np.float32)


def clip(x: np.ndarray, level: float) -> np.ndarray:
  """Hard clipping at +-level: the saturation of an overdriven recording chain."""
  return np.clip(x, -level, level).astype(np.float32)


# ---- The chain -------------------------------------------------------------------------------


def _speed_factor(n: int, factor: float, min_samples: int, max_samples: int) -> float | None:
  """`factor`, moved inside the bounds on the output length; None when no factor fits."""
  lo, hi = n / max_samples, n / max(min_samples, 1)  # output length ~ n / factor
  factor = min(max(factor, lo), hi)
  out = math.ceil(n * SAMPLE_RATE / speed_rate(factor))
  return factor if min_samples <= out <= max_samples else None


def augment(samples: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, *,
            min_samples: int = 0, max_samples: int | None = None) -> np.ndarray:
  """A random chain: speed -> reverb -> noise -> telephone -> gain -> clip, in [-1, 1].

  The same `rng` state gives bit-identical output. Speed perturbation keeps the output within
  [min_samples, max_samples] (the caller's bucket and the CTC frames its transcript needs),
  skipping the effect when no factor in range does.
  """
  if not cfg.enabled:
    return samples
  x = np.asarray(samples, np.float32)
  u = rng.random(6)  # one draw per effect, whatever the probabilities: the stream stays aligned
  if u[0] < cfg.speed_prob:
    factor = _speed_factor(len(x), rng.uniform(cfg.speed_min, cfg.speed_max), min_samples,
                           max_samples if max_samples is not None else 2 * len(x) + 1)
    if factor is not None:
      x = speed(x, factor)
  if u[1] < cfg.reverb_prob:
    x = reverb(x, rng.uniform(cfg.reverb_rt60_min, cfg.reverb_rt60_max),
               rng.uniform(cfg.reverb_wet_min, cfg.reverb_wet_max), rng)
  if u[2] < cfg.noise_prob:
    color = cfg.noise_colors[rng.integers(len(cfg.noise_colors))]
    x = add_noise(x, rng.uniform(cfg.noise_snr_db_min, cfg.noise_snr_db_max), color, rng)
  if u[3] < cfg.telephone_prob:
    x = telephone(x)
  if u[4] < cfg.gain_prob:
    x = gain(x, rng.uniform(cfg.gain_db_min, cfg.gain_db_max))
  if u[5] < cfg.clip_prob:
    x = clip(x, rng.uniform(cfg.clip_level_min, cfg.clip_level_max))
  return np.clip(x, -1.0, 1.0).astype(np.float32)


# ---- Feature effects -------------------------------------------------------------------------

WARP_KNEE = 0.8  # VTLP: frequencies up to this share of Nyquist scale by the factor, then the
# warp runs linearly to Nyquist, so the band edges stay where they are


def vtlp_source_hz(f: np.ndarray, factor: float) -> np.ndarray:
  """The frequency whose energy lands at `f` when the spectrum is warped by `factor`: f / factor
  below the knee, then a straight line to Nyquist (which maps to itself)."""
  nyquist = SAMPLE_RATE / 2
  knee = WARP_KNEE * nyquist * min(factor, 1.0)  # the knee's image stays below Nyquist
  upper = knee / factor + (f - knee) * (nyquist - knee / factor) / (nyquist - knee)
  return np.where(f <= knee, f / factor, upper)


def warp_frequency(mel_FxM: np.ndarray, factor: float) -> np.ndarray:
  """Log-mel features as if said by a vocal tract 1 / `factor` as long: each bin reads the
  (interpolated) bin at its source frequency."""
  m = mel_FxM.shape[-1]
  centers = features.mel_centers_hz(m)
  pos = np.interp(vtlp_source_hz(centers, factor), centers, np.arange(m, dtype=np.float64))
  lo = np.clip(np.floor(pos).astype(np.int64), 0, m - 1)
  hi = np.minimum(lo + 1, m - 1)
  w = (pos - lo).astype(np.float32)
  return (mel_FxM[..., lo] * (1.0 - w) + mel_FxM[..., hi] * w).astype(np.float32)


EQ_POINTS = 5  # control points of the equalizer's gain curve, spread evenly over the mel bins
FEATURE_PER_DB = 1 / 40  # features are log10(power) / 4: one dB is a tenth of a log10, / 4


def equalize(mel_FxM: np.ndarray, gains_db: np.ndarray) -> np.ndarray:
  """Adds a gain curve through `gains_db` (evenly spaced over the mel bins, linear between) to
  every frame; frames at the feature floor (silence) stay there."""
  m = mel_FxM.shape[-1]
  curve = np.interp(np.arange(m), np.linspace(0, m - 1, len(gains_db)), gains_db)
  floor = (features.LOG_FLOOR + 4.0) / 4.0
  shifted = np.maximum(mel_FxM + (curve * FEATURE_PER_DB).astype(np.float32), floor)
  return np.where(mel_FxM > floor, shifted, mel_FxM).astype(np.float32)


def mask_frequency(mel_FxM: np.ndarray, start: int, width: int, value: float) -> np.ndarray:
  out = mel_FxM.copy()
  out[:, start:start + width] = value
  return out


def mask_time(mel_FxM: np.ndarray, start: int, width: int, value: float) -> np.ndarray:
  out = mel_FxM.copy()
  out[start:start + width] = value
  return out


def features_enabled(cfg: AugmentConfig) -> bool:
  return cfg.enabled and (cfg.warp_prob > 0 or cfg.eq_prob > 0 or (cfg.freq_masks > 0 and cfg.freq_mask_bins > 0)
                          or (cfg.time_masks > 0 and cfg.time_mask_frames > 0))


def augment_features(mel_FxM: np.ndarray, frames: int, cfg: AugmentConfig,
                     rng: np.random.Generator) -> np.ndarray:
  """Warp, equalizer, then masks, on the first `frames` frames of one utterance's features [F, M] (the
  padding after them stays as it is); masks hold the utterance's mean feature value.

  Draws a fixed number of values whatever the probabilities, so the stream stays aligned.
  """
  if not features_enabled(cfg) or frames <= 0:
    return mel_FxM
  x = mel_FxM[:frames]
  m = x.shape[-1]
  u, factor = rng.random(), rng.uniform(cfg.warp_min, cfg.warp_max)
  if u < cfg.warp_prob:
    x = warp_frequency(x, factor)
  u, gains = rng.random(), rng.uniform(-cfg.eq_db, cfg.eq_db, EQ_POINTS)
  if u < cfg.eq_prob:
    x = equalize(x, gains)
  value = float(x.mean())
  for _ in range(cfg.freq_masks):
    width, start = rng.integers(0, cfg.freq_mask_bins + 1), rng.random()
    if width:
      x = mask_frequency(x, int(start * (m - width + 1)), int(width), value)
  limit = min(cfg.time_mask_frames, int(cfg.time_mask_ratio * frames))
  for _ in range(cfg.time_masks):
    width, start = rng.integers(0, max(limit, 0) + 1), rng.random()
    if width:
      x = mask_time(x, int(start * (frames - width + 1)), int(width), value)
  out = mel_FxM.copy()
  out[:frames] = x
  return out
