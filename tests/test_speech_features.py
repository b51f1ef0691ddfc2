"""The log-mel front end: Whisper v3's frame rate, shapes and STFT; exact 12.5 Hz token count."""

import numpy as np
import pytest

from sptlm.speech import features


def test_frame_rate_and_shapes_batched():
  rng = np.random.default_rng(0)
  audio_BxS = rng.normal(size=(3, 16_000)).astype(np.float32) * 0.1
  mel = features.log_mel(audio_BxS)
  assert mel.shape == (3, 100, 128) and mel.dtype == np.float32  # 10 ms hop: 100 frames/s
  np.testing.assert_allclose(features.log_mel(audio_BxS[1]), mel[1], rtol=1e-6, atol=1e-6)
  for tokens in (1, 7, 40):
    n = tokens * features.SAMPLES_PER_TOKEN
    assert features.log_mel(np.zeros(n, np.float32)).shape[0] == tokens * 8


def test_levels_are_bounded_and_chunk_independent():
  rng = np.random.default_rng(1)
  x = (rng.normal(size=32_000) * 0.3).astype(np.float32)
  mel = features.log_mel(x)
  assert mel.min() >= (features.LOG_FLOOR + 4) / 4 - 1e-6
  assert np.all(features.log_mel(np.zeros(1280, np.float32)) == (features.LOG_FLOOR + 4) / 4)
  # A frame away from the edges is the same whether computed in the whole or in a piece.
  piece = features.log_mel(x[8_000:24_000])
  np.testing.assert_allclose(piece[5:-5], mel[50 + 5:150 - 5], rtol=1e-5, atol=1e-5)


def test_mel_filters_are_slaney_triangles():
  f = features.mel_filters(128)
  assert f.shape == (128, 201) and np.all(f >= 0)
  assert np.all(f.max(axis=1) > 0)  # no empty band
  peaks = f.argmax(axis=1)
  assert np.all(np.diff(peaks) >= 0)  # increasing centre frequencies


def test_power_spectrum_matches_torch_stft():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 4_000)).astype(np.float32)
  want = torch.stft(torch.from_numpy(x), 400, 160, window=torch.hann_window(400),
                    return_complex=True).abs().pow(2).numpy()[..., :-1]
  got = features.power_spectrogram(x)
  np.testing.assert_allclose(got, np.swapaxes(want, 1, 2), rtol=1e-4, atol=1e-3)
