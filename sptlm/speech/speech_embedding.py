"""Google's speech_embedding as a frozen front end: 32-bin log-mel (100 Hz) -> 96-d at 12.5 Hz.

Why: a tokenizer trained only on synthetic voices learns the synthesizers. speech_embedding
(Lin et al. 2020, "Training keyword spotters with limited and synthesized speech data") is a
small CNN pre-trained on a large amount of real speech, so that classifiers trained on top of it
from synthetic speech alone work on real voices. Measured here: retrieving the same sentence
said by another TTS engine by DTW over the features is 100% right with these embeddings and
40-80% with log-mel (30 sentences, five engine pairs). Its stride is 8 mel frames: 80 ms, one
12.5 Hz token per embedding.

Weights: the ONNX export shipped inside PyPI's `openwakeword==0.4.0` wheel
(resources/models/{melspectrogram,embedding_model}.onnx; the embedding is Google's, Apache-2.0).
They are read with `onnx` and run here in JAX (the CNN, fully convolutional in time, so a whole
clip is one call) and numpy (the mel); nothing is downloaded. Two changes from openWakeWord's
use: each mel frame is centred on its 10 ms hop like the Whisper features (the audio is padded
by half a window), and the -80 dB floor is fixed rather than relative to the clip's loudest
frame, so a frame's value never depends on which chunk it was computed in.

Token i's embedding sees the 76 frames (760 ms) centred on token i.
"""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from sptlm.errors import UserError

NUM_MELS = 32
DIM = 96  # embedding width
DIMS = {"embedding": DIM, "pool4": 4 * DIM}  # per token, by the layer `embed` stops at
WINDOW = 76  # mel frames one embedding reads
STRIDE = 8  # mel frames per embedding (80 ms)
PAD_FRAMES = (WINDOW - STRIDE) // 2  # 34 frames each side: window centred on its token
N_FFT = 512
HOP = 160
# dB floor: openWakeWord floors at (the clip's max - 80 dB); the max of speech in the corpus
# clips (int16 scale) sits near 100 dB, so a fixed 20 dB floor keeps the same range
FLOOR_DB = 20.0
SCALE = 32767.0  # the model was fed int16-scale samples
RECEPTIVE_SECONDS = WINDOW / 2 * HOP / 16_000  # 0.38 s each way


class MissingWeights(UserError, FileNotFoundError):
  """openwakeword (whose wheel carries the weights) is not installed."""


def _model_file(name: str) -> pathlib.Path:
  spec = importlib.util.find_spec("openwakeword")
  if spec is None or not spec.submodule_search_locations:
    raise MissingWeights("model.frontend='speech_embedding' reads its weights from the "
                         "openwakeword==0.4.0 wheel: pip install 'openwakeword==0.4.0' onnx "
                         "(or pip install -e '.[speech]')")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "resources" / "models" / name
  if not path.exists():
    raise MissingWeights(f"{path}: missing; openwakeword==0.4.0 ships it (newer releases "
                         "download it instead): pip install 'openwakeword==0.4.0'")
  return path


@functools.cache
def _graph(name: str) -> tuple[list, dict[str, np.ndarray]]:
  import onnx  # pylint: disable=import-outside-toplevel
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  model = onnx.load(str(_model_file(name)))
  inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
  return list(model.graph.node), inits


@functools.cache
def _mel_weights() -> tuple[np.ndarray, np.ndarray]:
  """STFT as a [512, 2 * 257] matrix (real, imag) and the mel matrix [257, 32]."""
  nodes, inits = _graph("melspectrogram.onnx")
  convs = [inits[n.input[1]] for n in nodes if n.op_type == "Conv"]
  mats = [inits[i] for n in nodes if n.op_type == "MatMul" for i in n.input if i in inits]
  if len(convs) != 2 or len(mats) != 1:
    raise MissingWeights("melspectrogram.onnx: not the graph of openwakeword==0.4.0")
  stft = np.concatenate([c[:, 0, :].T for c in convs], axis=1).astype(np.float32)
  return stft, mats[0].astype(np.float32)


def log_mel(audio_BxS: np.ndarray) -> np.ndarray:
  """16 kHz audio [B, S] (or [S]) in [-1, 1] -> [B, S // 160, 32]: frame k centred on sample
  160 k, in the scale the CNN was trained on (dB / 10 + 2)."""
  audio = np.asarray(audio_BxS, np.float32)
  single = audio.ndim == 1
  if single:
    audio = audio[None]
  stft, mel = _mel_weights()
  b, s = audio.shape
  frames = s // HOP
  padded = np.pad(audio * SCALE, ((0, 0), (N_FFT // 2, N_FFT // 2)))
  out = np.empty((b, frames, NUM_MELS), np.float32)
  block = 4096
  for start in range(0, frames, block):
    stop = min(frames, start + block)
    idx = (np.arange(start, stop) * HOP)[:, None] + np.arange(N_FFT)[None, :]
    spec = padded[:, idx] @ stft
    half = spec.shape[-1] // 2
    power = spec[..., :half] ** 2 + spec[..., half:] ** 2
    db = 10.0 * np.log10(np.maximum(power @ mel, 1e-10))
    out[:, start:stop] = np.maximum(db, FLOOR_DB) / 10.0 + 2.0
  return out[0] if single else out


@functools.cache
def _layers() -> tuple[tuple, ...]:
  """The CNN as (op, arrays, attributes) in graph order (a chain from input to output)."""
  import onnx  # pylint: disable=import-outside-toplevel
  nodes, inits = _graph("embedding_model.onnx")
  consts = {}
  for n in nodes:
    if n.op_type == "Constant":
      consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
  layers = []
  for n in nodes:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    arrays = tuple(inits.get(i, consts.get(i)) for i in n.input[1:])
    if n.op_type in ("Pad", "Reshape", "Constant"):
      continue  # the input layout and frequency padding are done in `embed`
    if n.op_type not in ("Conv", "Relu", "BatchNormalization", "LeakyRelu", "Max", "MaxPool"):
      raise MissingWeights(f"embedding_model.onnx: unexpected op {n.op_type}; not the graph "
                           "of openwakeword==0.4.0")
    layers.append((n.op_type, arrays, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                    for k, v in attrs.items()))))
  return tuple(layers)


def _pads(attrs: dict, key: str = "pads") -> list[tuple[int, int]]:
  p = attrs.get(key, (0, 0, 0, 0))
  return [(p[0], p[2]), (p[1], p[3])]


SILENCE = FLOOR_DB / 10.0 + 2.0  # what a frame of digital silence reads


def embed(mel_BxFx32: jax.Array, valid_BxF: jax.Array | None = None,
          layer: str = "embedding") -> jax.Array:
  """[B, 8N, 32] (this module's log_mel) -> [B, N, DIMS[layer]]: token i from the 760 ms
  around it. layer="embedding" is the model's output; "pool4" stops after the fourth max-pool
  (96 channels x 2 mel bands at 25 Hz) and gives each token its two central frames: finer
  in time and less abstract, nearly as engine-independent (benchmarks/feature_invariance.py).
  Frames outside the input or not valid (batch padding) read as silence, so a clip's tokens
  do not depend on what it was batched with."""
  x = mel_BxFx32.astype(jnp.float32)
  silence = SILENCE
  if valid_BxF is not None:
    x = jnp.where(valid_BxF[..., None], x, silence)
  x = jnp.pad(x, ((0, 0), (PAD_FRAMES, PAD_FRAMES), (0, 0)), constant_values=silence)
  x = jnp.pad(x, ((0, 0), (0, 0), (1, 1)))[:, None]  # the graph's zero frequency padding: NCHW
  if layer not in DIMS:
    raise ValueError(f"speech_embedding layer {layer!r} is not one of {', '.join(DIMS)}")
  pools = 0
  for op, arrays, attrs in _layers():
    attrs = dict(attrs)
    if op == "Conv":
      w = jnp.asarray(arrays[0])
      x = jax.lax.conv_general_dilated(x, w, (1, 1), _pads(attrs),
                                       dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                       precision=jax.lax.Precision.HIGHEST)
      if len(arrays) > 1 and arrays[1] is not None:
        x = x + jnp.asarray(arrays[1])[None, :, None, None]
    elif op == "Relu":
      x = jax.nn.relu(x)
    elif op == "BatchNormalization":
      scale, bias, mean, var = (jnp.asarray(a)[None, :, None, None] for a in arrays)
      x = (x - mean) * scale / jnp.sqrt(var + attrs.get("epsilon", 1e-5)) + bias
    elif op == "LeakyRelu":
      x = jax.nn.leaky_relu(x, attrs["alpha"])
    elif op == "Max":
      x = jnp.maximum(x, jnp.asarray(arrays[0]).reshape(()))
    elif op == "MaxPool":
      kh, kw = attrs["kernel_shape"]
      sh, sw = attrs["strides"]
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, kh, kw), (1, 1, sh, sw),
                                "VALID")
      pools += 1
      if layer == "pool4" and pools == 4:  # [B, 96, 2N + 8, 2]: token i reads 2i+4, 2i+5
        b, c, t, f = x.shape
        n = (t - 8) // 2
        x = jnp.transpose(x[:, :, 4:4 + 2 * n], (0, 2, 1, 3))  # [B, 2N, 96, 2]
        return x.reshape(b, n, 2 * c * f)
  return jnp.transpose(x[:, :, :, 0], (0, 2, 1))  # [B, 96, N, 1] -> [B, N, 96]
