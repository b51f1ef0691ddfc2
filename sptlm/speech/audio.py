"""Reading audio for the tokenizer: any WAV sample rate -> 16 kHz mono float32, with checks.

Every problem a user can fix (a missing, unreadable or non-WAV file, a wrong channel count,
audio too short for one token or too long for memory) is an `AudioError` whose message names
the file and says what to do; batch jobs record it and go on. Silent and clipped audio still
encode, with a warning.
"""

import dataclasses
import math
import pathlib
import struct
import warnings

import numpy as np
import scipy.io.wavfile
import scipy.signal

from sptlm.errors import UserError
from sptlm.speech.features import SAMPLE_RATE, SAMPLES_PER_TOKEN

MIN_SECONDS = SAMPLES_PER_TOKEN / SAMPLE_RATE  # 80 ms: one token
SILENCE_PEAK = 1e-4  # peak below this (-80 dBFS): silent
CLIP_LEVEL = 0.999
CLIP_FRACTION = 1e-3  # more samples than this at full scale: clipped


class AudioError(UserError, ValueError):
  """Audio that cannot be tokenized; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Audio:
  samples: np.ndarray  # float32 [S] at 16 kHz, in [-1, 1]
  source_rate: int
  warnings: tuple[str, ...]

  @property
  def seconds(self) -> float:
    return len(self.samples) / SAMPLE_RATE


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
  """Polyphase resampling (scipy) by the exact rational factor."""
  if rate == target:
    return x.astype(np.float32, copy=False)
  g = math.gcd(rate, target)
  return scipy.signal.resample_poly(x, target // g, rate // g).astype(np.float32)


def _to_float(data: np.ndarray) -> np.ndarray:
  if data.dtype == np.uint8:
    return (data.astype(np.float32) - 128.0) / 128.0
  if np.issubdtype(data.dtype, np.integer):
    return data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
  return data.astype(np.float32)


def check(samples: np.ndarray, name: str, *, max_seconds: float) -> tuple[str, ...]:
  """Raises for audio that cannot be encoded; returns warnings for audio that can."""
  seconds = len(samples) / SAMPLE_RATE
  if seconds < MIN_SECONDS:
    raise AudioError(f"{name}: too short ({seconds * 1000:.0f} ms); one token needs at least "
                     f"{MIN_SECONDS * 1000:.0f} ms of audio")
  if seconds > max_seconds:
    raise AudioError(f"{name}: too long ({seconds:.0f} s > {max_seconds:.0f} s); split it or "
                     "raise --max-seconds")
  if not np.all(np.isfinite(samples)):
    raise AudioError(f"{name}: contains NaN or infinite samples")
  notes = []
  peak = float(np.max(np.abs(samples)))
  if peak < SILENCE_PEAK:
    notes.append("silent (peak below -80 dBFS): its tokens encode silence")
  else:
    clipped = float(np.mean(np.abs(samples) >= CLIP_LEVEL))
    if clipped > CLIP_FRACTION:
      notes.append(f"clipped ({clipped:.1%} of samples at full scale)")
  return tuple(notes)


def prepare(samples: np.ndarray, rate: int, name: str = "audio", *, mix_channels: bool = False,
            max_seconds: float = 7200.0) -> Audio:
  """In-memory audio [S] or [S, C] at any rate -> checked 16 kHz mono."""
  x = _to_float(np.asarray(samples))
  if x.ndim == 2:
    if x.shape[1] == 1:
      x = x[:, 0]
    elif mix_channels:
      x = x.mean(axis=1)
    else:
      raise AudioError(f"{name}: {x.shape[1]} channels; the tokenizer takes mono audio "
                       "(pass --mix-channels to average the channels)")
  elif x.ndim != 1:
    raise AudioError(f"{name}: audio must be [samples] or [samples, channels], got {x.shape}")
  if rate <= 0:
    raise AudioError(f"{name}: invalid sample rate {rate}")
  if len(x) / rate > max_seconds:  # before resampling an enormous file
    raise AudioError(f"{name}: too long ({len(x) / rate:.0f} s > {max_seconds:.0f} s); split it "
                     "or raise --max-seconds")
  x = resample(x, rate)
  return Audio(x, rate, check(x, name, max_seconds=max_seconds))


def read(path: str | pathlib.Path, *, mix_channels: bool = False,
         max_seconds: float = 7200.0) -> Audio:
  """A WAV file (PCM 8/16/24/32-bit or float, any rate) -> checked 16 kHz mono."""
  path = pathlib.Path(path)
  if not path.exists():
    raise AudioError(f"{path}: no such file")
  if path.is_dir():
    raise AudioError(f"{path}: is a directory, not a WAV file")
  try:
    with path.open("rb") as f:
      head = f.read(12)
  except OSError as e:
    raise AudioError(f"{path}: cannot be read ({e.strerror})") from None
  if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
    raise AudioError(f"{path}: not a WAV file (convert it, e.g. ffmpeg -i IN -ar 16000 -ac 1 "
                     "OUT.wav)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", scipy.io.wavfile.WavFileWarning)
      rate, data = scipy.io.wavfile.read(path, mmap=False)
  except (ValueError, OSError, EOFError, struct.error) as e:
    raise AudioError(f"{path}: unreadable WAV ({e or type(e).__name__})") from None
  return prepare(data, rate, str(path), mix_channels=mix_channels, max_seconds=max_seconds)
