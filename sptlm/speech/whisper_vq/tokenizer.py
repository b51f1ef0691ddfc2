"""An imported WhisperVQ tokenizer behind sptlm's `SpeechTokenizer` API: audio -> 12.5 Hz codes.

  tok = SpeechTokenizer.load("runs/glm4voice_tokenizer")   # a `sptlm tokenizer import` dir
  codes = tok.encode([samples_16k])                         # N = ceil(S / 1280) codes each

Audio is cut as the reference cuts it: 30 s windows from the start of each input, each padded
to whole tokens and featurized on its own (`features.log_mel`). Windows of all inputs are
grouped by padded length (multiples of 32 tokens, 375 at most), batched and sharded over the
mesh's batch axis (every local device by default); padding rows and frames never change a real
token. Matrix products run at float32 precision ("highest") unless `precision` says otherwise.

The tokens are raw codebook indices; the file handling (`encode_files`: groups, per-file
errors and warnings) is `SpeechTokenizer`'s. There is no ASR head: `decode` / `transcribe`
say so (the release's Whisper decoder is not imported).
"""

import json
import logging
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sptlm import sharding
from sptlm.errors import InputError
from sptlm.speech.tokenizer import SpeechTokenizer
from sptlm.speech.whisper_vq import config as config_lib
from sptlm.speech.whisper_vq import features, weights
from sptlm.speech.whisper_vq import model as model_lib
from sptlm.speech.whisper_vq.config import WhisperVQConfig

log = logging.getLogger(__name__)
IMPORT_FILE = "whisper_vq_import.json"  # marks a `sptlm tokenizer import` work directory
WEIGHTS_FILE = "model.safetensors"
PAD_TOKENS = 32  # window lengths are padded to a multiple of this (few compiled shapes)
WINDOW_TOKENS = features.WINDOW_SAMPLES // features.SAMPLES_PER_TOKEN  # 375
# Data-parallel inference: the batch over every mesh axis, parameters whole on each device
# (the full-size encoder is 0.6B float32 parameters: 2.5 GB).
RULES: sharding.Rules = (
    ("batch", ("data", "fsdp", "tensor")), ("length", ()), ("act_embed", ()), ("embed", ()),
    ("heads", ()), ("head_dim", ()), ("mlp", ()), ("layers", ()), ("codebook", ()))


def is_imported(workdir: str | epath.Path) -> bool:
  return (epath.Path(workdir) / IMPORT_FILE).exists()


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)


def make_tokenize(cfg: WhisperVQConfig, mesh: Mesh, precision: str = "highest", *,
                  with_hidden: bool = False) -> Callable:
  """jitted (params, mel [B, 8N, M], samples [B]) -> codes [B, N] (and, with_hidden, the
  quantizer's input [B, N, D]); B must be a multiple of the mesh size."""
  graphdef = nnx.split(model_lib.abstract(cfg), nnx.Param)[0]
  batch = NamedSharding(mesh, sharding.spec(("batch",), RULES))
  batch2 = NamedSharding(mesh, sharding.spec(("batch", None), RULES))
  batch3 = NamedSharding(mesh, sharding.spec(("batch", None, None), RULES))

  def tokenize(params: dict, mel_BxFxM: jax.Array, samples_B: jax.Array):
    with sharding.logical_rules(mesh, RULES), jax.default_matmul_precision(precision):
      model = nnx.merge(graphdef, params)
      h_BxNxD, _ = model.hidden(mel_BxFxM, samples_B)
      codes_BxN = model.nearest(h_BxNxD)
      return (codes_BxN, h_BxNxD) if with_hidden else codes_BxN

  return jax.jit(tokenize, in_shardings=(NamedSharding(mesh, P()), batch3, batch),
                 out_shardings=(batch2, batch3) if with_hidden else batch2)


class WhisperVQTokenizer(SpeechTokenizer):
  """Encode-only `SpeechTokenizer` for an imported release (see the module docstring)."""

  can_transcribe = False

  def __init__(self, cfg: WhisperVQConfig, tensors: dict[str, np.ndarray], *, batch: int = 8,
               devices: Sequence[jax.Device] | None = None, precision: str = "highest",
               name: str = "imported WhisperVQ tokenizer"):
    # SpeechTokenizer.__init__ builds sptlm's own model: not called (only its file handling)
    self.wv_cfg, self.name = cfg, name
    self.mesh = data_mesh(devices)
    size = self.mesh.size
    self.batch = max(size, -(-batch // size) * size)  # a multiple of the devices
    params = weights.to_params(tensors, cfg)
    want = jax.tree.structure(nnx.split(model_lib.abstract(cfg), nnx.Param)[1].to_pure_dict())
    if jax.tree.structure(params) != want:
      raise AssertionError(f"parameter tree {jax.tree.structure(params)} != model's {want}")
    self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
    self.vq_state = {"vq": {"codebook": tensors[weights.ENCODER + "codebook.weight"]}}
    self._tokenize = {h: make_tokenize(cfg, self.mesh, precision, with_hidden=h)
                      for h in (False, True)}

  @property
  def codebook_size(self) -> int:
    return self.wv_cfg.codebook_size

  @classmethod
  def load(cls, workdir: str | epath.Path, **kwargs) -> "WhisperVQTokenizer":
    """A `sptlm tokenizer import` work directory. `lm`, `beam`, `alpha`, `beta` and `lexicon`
    (ASR decoding options of sptlm's own tokenizers) are accepted and unused."""
    for key in ("lm", "beam", "alpha", "beta", "lexicon"):
      kwargs.pop(key, None)
    wd = epath.Path(workdir)
    folder = _local_dir(wd) if str(wd).startswith("gs://") else pathlib.Path(str(wd))
    cfg, _ = config_lib.read(folder)
    tensors = weights.read(folder, cfg)
    log.info("loaded imported WhisperVQ tokenizer %s (%d codes)", wd, cfg.codebook_size)
    return cls(cfg, tensors, name=str(wd), **kwargs)

  # ---- Audio -> tokens ------------------------------------------------------------------

  def encode(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
    """16 kHz mono float audio -> int32 codes, exactly ceil(len / 1280) per input."""
    return [c for c, _ in self.encode_with_hidden(audios, keep_hidden=False)]

  def encode_with_hidden(self, audios: Sequence[np.ndarray], *, keep_hidden: bool = True
                         ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per input (codes [N], the quantizer's input [N, D] float32 or None)."""
    jobs = []  # (input, window index, samples of the window)
    for i, a in enumerate(audios):
      a = np.asarray(a, np.float32).reshape(-1)
      for w, (start, stop) in enumerate(features.window_bounds(len(a))):
        jobs.append((i, w, a[start:stop]))
    by_len: dict[int, list[tuple[int, int, np.ndarray]]] = {}
    for job in jobs:
      n = -(-len(job[2]) // features.SAMPLES_PER_TOKEN)
      by_len.setdefault(min(WINDOW_TOKENS, -(-n // PAD_TOKENS) * PAD_TOKENS), []).append(job)
    out: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
    m = self.wv_cfg.num_mel_bins
    for length, group in sorted(by_len.items()):
      for k in range(0, len(group), self.batch):
        chunk = group[k:k + self.batch]
        mel = np.zeros((self.batch, length * 8, m), np.float32)
        samples = np.full((self.batch,), features.SAMPLES_PER_TOKEN, np.int32)  # dummy rows
        for r, (_, _, x) in enumerate(chunk):
          feats = features.log_mel(x, m)
          mel[r, :len(feats)] = feats
          samples[r] = len(x)
        got = jax.device_get(self._tokenize[keep_hidden](self.params, mel, samples))
        codes, hidden = got if keep_hidden else (got, None)
        for r, (i, w, x) in enumerate(chunk):
          n = -(-len(x) // features.SAMPLES_PER_TOKEN)
          out[(i, w)] = (codes[r, :n].astype(np.int32),
                         None if hidden is None else hidden[r, :n].astype(np.float32))
    results = []
    for i in range(len(audios)):
      parts = [out[key] for key in sorted(k for k in out if k[0] == i)]
      codes = np.concatenate([c for c, _ in parts]) if parts else np.zeros((0,), np.int32)
      hidden = (np.concatenate([h for _, h in parts]) if parts and keep_hidden else None)
      results.append((codes, hidden))
    return results

  # ---- Tokens -> text: not available ----------------------------------------------------

  def _no_asr(self) -> InputError:
    return InputError(f"{self.name} is an imported WhisperVQ tokenizer: it encodes audio to "
                      "tokens but has no ASR head, so transcribe / decode are unavailable")

  def decode(self, codes: Sequence[np.ndarray]) -> list[str]:
    raise self._no_asr()

  def log_probs(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
    raise self._no_asr()

  def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
    raise self._no_asr()


def _local_dir(wd: epath.Path) -> pathlib.Path:
  """A gs:// work directory's config.json and weights, copied to one local directory."""
  import tempfile
  tmp = pathlib.Path(tempfile.mkdtemp())
  for name in ("config.json", WEIGHTS_FILE):
    (tmp / name).write_bytes((wd / name).read_bytes())
  return tmp


def describe(workdir: str | epath.Path) -> dict:
  return json.loads((epath.Path(workdir) / IMPORT_FILE).read_text())
