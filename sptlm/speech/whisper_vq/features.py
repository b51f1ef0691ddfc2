"""Whisper's log-mel features exactly as the released tokenizer computes them, and its 30 s cut.

The reference (GLM-4-Voice's speech_tokenizer/utils.py) cuts a file into 30 s windows from its
start, pads each window with zeros to a multiple of 1,280 samples (one token) and runs
transformers' `WhisperFeatureExtractor`: periodic Hann STFT (n_fft 400, hop 160, centred,
reflect padding, last frame dropped), |X|^2, Slaney mel filters, log10 floored at 1e-10, then
at (the window's maximum - 8), then (x + 4) / 4. Unlike `sptlm.speech.features` (a fixed floor,
for sptlm's own tokenizer) the floor depends on the window, so the windows must be the
reference's.

The STFT runs in float64: it equals the extractor's numpy path to about 1e-7 and its torch path
(what the reference runs when torch is installed) to 4e-5 at most, where float32 rounding in
that path shows at bins near the floor (7-8 decades below the loudest bin).

Legend: S samples, F frames (100 Hz), M mel bins.
"""

import numpy as np

from sptlm.speech import features as sptlm_features
from sptlm.speech.features import HOP, N_FFT, SAMPLE_RATE, SAMPLES_PER_TOKEN

WINDOW_SECONDS = 30
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # 480,000 samples: 375 tokens, 3,000 frames


def window_bounds(num_samples: int) -> list[tuple[int, int]]:
  """[start, stop) of the reference's 30 s windows: back to back from sample 0."""
  return [(a, min(num_samples, a + WINDOW_SAMPLES)) for a in range(0, num_samples,
                                                                      WINDOW_SAMPLES)]


def padded_length(num_samples: int) -> int:
  """Samples after the reference's padding to whole tokens."""
  return -(-num_samples // SAMPLES_PER_TOKEN) * SAMPLES_PER_TOKEN


def log_mel(window_S: np.ndarray, num_mels: int) -> np.ndarray:
  """One window (at most 30 s, 16 kHz) -> float32 [F, M], F = 8 * ceil(S / 1280): the features
  of the window zero-padded to whole tokens."""
  s = len(window_S)
  if s > WINDOW_SAMPLES:
    raise ValueError(f"a window holds at most {WINDOW_SAMPLES} samples, got {s}")
  n = padded_length(s)
  x_S = np.zeros(n, np.float64)
  x_S[:s] = window_S
  pad = N_FFT // 2
  x_S = np.pad(x_S, (pad, pad), mode="reflect")
  frames = n // HOP
  idx_FxN = (np.arange(frames) * HOP)[:, None] + np.arange(N_FFT)[None, :]
  hann_N = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic
  spec_FxP = np.fft.rfft(x_S[idx_FxN] * hann_N, axis=-1)
  power_FxP = spec_FxP.real ** 2 + spec_FxP.imag ** 2
  mel_FxM = power_FxP @ sptlm_features.mel_filters(num_mels).astype(np.float64).T
  log_FxM = np.log10(np.maximum(mel_FxM, 1e-10))
  log_FxM = np.maximum(log_FxM, log_FxM.max() - 8.0)
  return ((log_FxM + 4.0) / 4.0).astype(np.float32)
