"""Reading audio: any WAV rate and sample format to 16 kHz mono; every bad input a clear error."""

import re

import numpy as np
import pytest
import scipy.io.wavfile

from sptlm.speech import audio


def _tone(rate: int, seconds: float, amp: float = 0.3) -> np.ndarray:
  t = np.arange(int(rate * seconds)) / rate
  return (amp * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.mark.parametrize("rate, dtype", [(8000, np.int16), (22050, np.int16), (44100, np.int32),
                                         (48000, np.float32), (16000, np.uint8)])
def test_any_rate_and_format_resampled_to_16k(tmp_path, rate, dtype):
  x = _tone(rate, 0.5)
  if dtype == np.uint8:
    data = np.round(x * 127 + 128).astype(np.uint8)
  elif dtype == np.float32:
    data = x
  else:
    data = np.round(x * np.iinfo(dtype).max).astype(dtype)
  path = tmp_path / "a.wav"
  scipy.io.wavfile.write(path, rate, data)
  a = audio.read(path)
  assert a.samples.dtype == np.float32 and a.source_rate == rate
  assert len(a.samples) == pytest.approx(8000, abs=1)
  assert np.abs(a.samples).max() == pytest.approx(0.3, abs=0.02)
  assert a.warnings == ()


def test_bad_inputs_are_clear_errors(tmp_path):
  cases = {}
  cases["missing"] = (tmp_path / "missing.wav", "no such file")
  (tmp_path / "text.wav").write_text("not audio at all")
  cases["text"] = (tmp_path / "text.wav", "not a WAV file")
  (tmp_path / "dir.wav").mkdir()
  cases["dir"] = (tmp_path / "dir.wav", "directory")
  good = tmp_path / "good.wav"
  scipy.io.wavfile.write(good, 16000, (_tone(16000, 1.0) * 32767).astype(np.int16))
  (tmp_path / "torn.wav").write_bytes(good.read_bytes()[:30])
  cases["torn"] = (tmp_path / "torn.wav", "unreadable WAV")
  scipy.io.wavfile.write(tmp_path / "short.wav", 16000, np.ones(1000, np.int16) * 1000)
  cases["short"] = (tmp_path / "short.wav", "too short (62 ms)")
  stereo = np.stack([_tone(16000, 1.0), _tone(16000, 1.0)], 1)
  scipy.io.wavfile.write(tmp_path / "stereo.wav", 16000, stereo)
  cases["stereo"] = (tmp_path / "stereo.wav", "2 channels")
  for name, (path, message) in cases.items():
    with pytest.raises(audio.AudioError, match=re.escape(message)) as info:
      audio.read(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value), name
  assert len(audio.read(tmp_path / "stereo.wav", mix_channels=True).samples) == 16000
  with pytest.raises(audio.AudioError, match="too long"):
    audio.read(good, max_seconds=0.5)


def test_silent_and_clipped_audio_encode_with_a_warning(tmp_path):
  scipy.io.wavfile.write(tmp_path / "silent.wav", 16000, np.zeros(16000, np.int16))
  assert "silent" in audio.read(tmp_path / "silent.wav").warnings[0]
  clipped = np.clip(_tone(16000, 1.0, amp=3.0), -1, 1)
  scipy.io.wavfile.write(tmp_path / "clipped.wav", 16000, clipped)
  assert "clipped" in audio.read(tmp_path / "clipped.wav").warnings[0]
