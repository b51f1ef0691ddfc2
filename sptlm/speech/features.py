"""Whisper v3's log-mel front end in numpy: 16 kHz, 25 ms Hann window, 10 ms hop, 128 bins.

The STFT, the Slaney mel filters and the (x + 4) / 4 scaling are Whisper's. One thing differs:
Whisper floors each 30 s window at (its own maximum - 8); here the floor is a fixed level, so a
frame's features never depend on which chunk it was computed in and any length can be encoded
in pieces that match the whole.

Frame rate: N samples give N // 160 frames, so one 12.5 Hz token (1,280 samples) is 8 frames.
"""

import functools

import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160
SAMPLES_PER_TOKEN = 1_280  # 80 ms: the conv stem halves 100 Hz to 50 Hz, pooling x4 gives 12.5 Hz
FRAMES_PER_TOKEN = SAMPLES_PER_TOKEN // HOP
LOG_FLOOR = -8.0  # log10 power; about 80 dB below a full-scale sine's mel energy
_BLOCK_FRAMES = 8_192  # STFT this many frames at a time: bounded memory for hour-long audio


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
  """Slaney's mel scale (librosa's default, which Whisper's filters use)."""
  f = np.asarray(f, np.float64)
  f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, np.log(6.4) / 27.0
  log_part = min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep
  return np.where(f >= min_log_hz, log_part, f / f_sp)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
  m = np.asarray(m, np.float64)
  f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, np.log(6.4) / 27.0
  return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.cache
def mel_filters(num_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
  """[num_mels, n_fft // 2 + 1] Slaney-normalised triangles from 0 Hz to Nyquist."""
  fft_hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), num_mels + 2))
  fdiff = np.diff(mel_hz)
  ramps = mel_hz[:, None] - fft_hz[None, :]
  lower = -ramps[:-2] / fdiff[:-1, None]
  upper = ramps[2:] / fdiff[1:, None]
  weights = np.maximum(0.0, np.minimum(lower, upper))
  weights *= (2.0 / (mel_hz[2:num_mels + 2] - mel_hz[:num_mels]))[:, None]
  return weights.astype(np.float32)


def mel_centers_hz(num_mels: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Centre frequency of each of mel_filters' bins."""
  mels = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), num_mels + 2)
  return _mel_to_hz(mels)[1:-1]


@functools.cache
def _window() -> np.ndarray:
  n = np.arange(N_FFT)
  return (0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)).astype(np.float32)  # periodic Hann


def num_frames(num_samples: int) -> int:
  return num_samples // HOP


def power_spectrogram(audio_BxS: np.ndarray) -> np.ndarray:
  """|STFT|^2 [B, S // 160, 201]: centred frames, reflect padding, last frame dropped."""
  audio_BxS = np.asarray(audio_BxS, np.float32)
  b, s = audio_BxS.shape
  pad = N_FFT // 2
  mode = "reflect" if s > pad else "constant"
  padded = np.pad(audio_BxS, ((0, 0), (pad, pad)), mode=mode)
  frames = num_frames(s)
  out = np.empty((b, frames, N_FFT // 2 + 1), np.float32)
  for start in range(0, frames, _BLOCK_FRAMES):
    stop = min(frames, start + _BLOCK_FRAMES)
    idx = (np.arange(start, stop) * HOP)[:, None] + np.arange(N_FFT)[None, :]
    spec = np.fft.rfft(padded[:, idx] * _window(), axis=-1)
    out[:, start:stop] = spec.real ** 2 + spec.imag ** 2
  return out


def log_mel(audio_BxS: np.ndarray, num_mels: int = 128) -> np.ndarray:
  """Batched 16 kHz audio [B, S] (or [S]) -> features [B, S // 160, num_mels] (float32)."""
  audio = np.asarray(audio_BxS, np.float32)
  single = audio.ndim == 1
  if single:
    audio = audio[None]
  power_BxFxP = power_spectrogram(audio)
  mel_BxFxM = power_BxFxP @ mel_filters(num_mels).T
  log = np.maximum(np.log10(np.maximum(mel_BxFxM, 1e-10)), LOG_FLOOR)
  out = ((log + 4.0) / 4.0).astype(np.float32)
  return out[0] if single else out


MOONSHINE_DIM = 288  # sptlm.speech.moonshine.DIM (kept here so features need not import it)
HYBRID_MELS = 128  # model.frontend="moonshine_tiny_mel": Whisper's bins after Moonshine's 288


def featurize(audio_BxS: np.ndarray, num_mels: int, frontend: str = "whisper_mel",
              lengths_B: np.ndarray | None = None) -> np.ndarray:
  """The model's input features (model.frontend): [B, S // 160, num_mels] each way.
  `lengths_B`: where each row's audio ends (the Moonshine encoder must not see the padding)."""
  if frontend in ("moonshine_tiny", "moonshine_tiny_mel"):
    from sptlm.speech import moonshine  # pylint: disable=import-outside-toplevel
    moon = moonshine.features(audio_BxS, lengths_B)
    return moon if frontend == "moonshine_tiny" else with_mel(moon, audio_BxS, frontend)
  if frontend.startswith("speech_embedding"):
    from sptlm.speech import speech_embedding  # pylint: disable=import-outside-toplevel
    return speech_embedding.log_mel(audio_BxS)
  return log_mel(audio_BxS, num_mels)


def with_mel(moon_BxFxE: np.ndarray, audio_BxS: np.ndarray, frontend: str) -> np.ndarray:
  """"moonshine_tiny_mel"'s features from Moonshine's (computed or cached) and the audio:
  [B, F, 288 + 128], Moonshine's first. The log-mel is cheap, so only Moonshine's part is cached
  (sptlm.speech.feature_cache) and the same cache serves both front ends."""
  if frontend != "moonshine_tiny_mel":
    return moon_BxFxE
  mel = log_mel(audio_BxS, HYBRID_MELS)
  return np.concatenate([moon_BxFxE, mel[:, :moon_BxFxE.shape[1]]], axis=-1)
