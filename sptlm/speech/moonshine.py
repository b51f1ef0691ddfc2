"""Moonshine tiny's ASR encoder as a frozen front end: 16 kHz audio -> 288-d features at 100 Hz.

Why: every front end trained here has heard synthetic voices only, and an engine it never
heard is transcribed at 44-53% CER whatever else is tried (BENCHMARKS.md, runs 5-11). Moonshine
(Jeffries et al. 2024, "Moonshine: Speech Recognition for Live Transcription and Voice
Commands") is an encoder-decoder ASR model trained on about 200k hours of real, transcribed
speech; its encoder's output carries the words, not the voice. The tokenizer's layers, VQ and
CTC head are trained on top of it, the encoder stays frozen.

Weights: the ONNX Runtime files inside PyPI's `moonshine-voice==0.0.73` wheel (MIT;
moonshine_voice/assets/tiny-en/encoder_model.ort; releases from 0.1 download it instead), run
with onnxruntime in the input pipeline; nothing is downloaded and the package is never imported.

The encoder attends over, and normalizes across, its whole input, so it runs on blocks of
BLOCK_TOKENS tokens counted from the start of the audio, each with up to CONTEXT_TOKENS of
audio either side (less at the ends of the audio), one block per call. A token's features
then depend only on its block, that context and where the audio ends, never on what else is
in the batch or how far the padding goes, and a long file featurized once and cut into windows
gives exactly the whole file's tokens. Its output (one frame per 384 samples, 24 ms) is
linearly interpolated to the 10 ms frame grid of the mel front end: frame f at sample 160 f + 80.
"""

import functools
import importlib.util
import pathlib

import numpy as np

from sptlm.errors import UserError

DIM = 288
SAMPLES_PER_TOKEN = 1_280
BLOCK_TOKENS = 64  # 5.12 s encoded together
CONTEXT_TOKENS = 16  # 1.28 s of audio either side of a block
HOP = 160  # the 100 Hz frame grid the model's input uses
STRIDE = 384  # samples per encoder frame (conv strides 64 x 3 x 2)
CENTRE = (127 + 64 * (6 + 3 * 2)) / 2  # an encoder frame's receptive field is 895 samples
RECEPTIVE_SECONDS = (BLOCK_TOKENS + CONTEXT_TOKENS) * SAMPLES_PER_TOKEN / 16_000
PACKAGE = "moonshine-voice==0.0.73"


class MissingWeights(UserError, FileNotFoundError):
  """moonshine-voice (whose wheel carries the weights) is not installed."""


def model_file() -> pathlib.Path:
  spec = importlib.util.find_spec("moonshine_voice")  # finds, never imports (sounddevice)
  if spec is None or not spec.submodule_search_locations:
    raise MissingWeights(f"model.frontend='moonshine_tiny' reads its weights from the "
                         f"{PACKAGE} wheel: pip install '{PACKAGE}' onnxruntime (or pip "
                         "install -e '.[moonshine]')")
  path = (pathlib.Path(list(spec.submodule_search_locations)[0]) / "assets" / "tiny-en" /
          "encoder_model.ort")
  if not path.exists():
    raise MissingWeights(f"{path}: missing; {PACKAGE} ships it (releases from 0.1 download "
                         f"it instead): pip install '{PACKAGE}'")
  return path


@functools.cache
def _session():
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  options = ort.SessionOptions()
  options.intra_op_num_threads = 1  # the input pipeline runs several loaders at once
  options.log_severity_level = 3
  return ort.InferenceSession(str(model_file()), options, providers=["CPUExecutionProvider"])


def encoder_frames(num_samples: int) -> int:
  """Output frames of the encoder for an input of num_samples (its conv stem's arithmetic)."""
  return (((num_samples - 127) // 64 + 1 - 7) // 3 + 1 - 3) // 2 + 1


def encode_blocks(blocks_KxL: np.ndarray) -> np.ndarray:
  """[K, L] audio -> [K, encoder_frames(L), 288]."""
  x = np.ascontiguousarray(blocks_KxL, np.float32)
  out = _session().run(None, {"input_values": x, "attention_mask": np.ones(x.shape, np.int64)})
  return out[0].astype(np.float32)


def _resample(enc_ExD: np.ndarray, offset: int, frames: int) -> np.ndarray:
  """Encoder frames of an input starting `offset` samples before the first wanted 100 Hz frame
  -> those `frames` 100 Hz frames, linearly interpolated (clamped at the input's ends)."""
  at = (np.arange(frames) * HOP + HOP / 2 + offset - CENTRE) / STRIDE
  at = np.clip(at, 0, len(enc_ExD) - 1)
  left = np.floor(at).astype(np.int64)
  right = np.minimum(left + 1, len(enc_ExD) - 1)
  w = (at - left).astype(np.float32)[:, None]
  return enc_ExD[left] * (1 - w) + enc_ExD[right] * w


def features(audio_BxS: np.ndarray, lengths_B: np.ndarray | None = None) -> np.ndarray:
  """16 kHz audio [B, S] (or [S]) in [-1, 1] -> [B, S // 160, 288], 100 Hz frames.

  `lengths_B` (default S) says where each row's audio ends, rounded up to whole tokens: the
  encoder never sees the padding past it (its frames are 0), so a clip's features are the
  same alone or in a padded batch. The encoder normalizes over its whole input, so each block
  is encoded alone, at its own length.
  """
  audio = np.asarray(audio_BxS, np.float32)
  single = audio.ndim == 1
  if single:
    audio = audio[None]
  b, s = audio.shape
  out = np.zeros((b, s // HOP, DIM), np.float32)
  block = BLOCK_TOKENS * SAMPLES_PER_TOKEN
  ctx = CONTEXT_TOKENS * SAMPLES_PER_TOKEN
  for r in range(b):
    end = s if lengths_B is None else int(lengths_B[r])
    end = min(s, -(-end // SAMPLES_PER_TOKEN) * SAMPLES_PER_TOKEN)
    for core in range(0, end, block):
      core_end = min(end, core + block)
      lo, hi = max(0, core - ctx), min(end, core_end + ctx)
      enc = encode_blocks(audio[r, lo:hi][None])[0]
      first, last = core // HOP, min(core_end // HOP, s // HOP)
      out[r, first:last] = _resample(enc, core - lo, last - first)
  return out[0] if single else out
