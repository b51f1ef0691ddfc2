"""model.frontend='speech_embedding': Google's speech_embedding from openwakeword 0.4.0's ONNX
files, run in numpy (mel) and JAX (CNN), against onnxruntime running the same files."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sptlm.speech import config as config_lib
from sptlm.speech import input as input_lib
from sptlm.speech import program, speech_embedding, tokenizer

import test_speech_model  # noqa: E402  (tests/ is on sys.path)
from test_speech_model import units  # noqa: F401,E402  (the module's fixture)

ort = pytest.importorskip("onnxruntime")
CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / \
    "speech_tokenizer_robust_embedding.py"
EXTRA = ["--config.model.layers_before_vq=2", "--config.model.conv_kernel=3",
         "--config.model.attention_window_seconds=0.2", "--config.model.init_std=0.2"]


def small_config(*extra: str) -> config_lib.SpeechTokenizerConfig:
  return config_lib.load(CONFIG, [*test_speech_model.SMALL, *EXTRA, *extra])


def _session(name: str):
  return ort.InferenceSession(str(speech_embedding._model_file(name)),
                              providers=["CPUExecutionProvider"])


def _speechlike(seconds: float, seed: int) -> np.ndarray:
  """Tones and noise bursts of varying loudness: every mel bin and level gets exercised."""
  rng = np.random.default_rng(seed)
  t = np.arange(800) / 16_000
  parts = []
  for _ in range(int(seconds * 20)):
    if rng.random() < 0.3:
      parts.append(rng.normal(size=800) * rng.uniform(0.001, 0.2))
    else:
      parts.append(rng.uniform(0.01, 0.6) * np.sin(2 * np.pi * rng.uniform(80, 7000) * t))
  return np.concatenate(parts).astype(np.float32)


def test_log_mel_is_the_onnx_melspectrogram_centred_with_a_fixed_floor():
  x = _speechlike(2.0, 0)
  ours = speech_embedding.log_mel(x)
  assert ours.shape == (len(x) // 160, 32)
  padded = np.pad(x * speech_embedding.SCALE, (256, 256)).astype(np.float32)[None]
  ref_db = _session("melspectrogram.onnx").run(None, {"input": padded})[0].squeeze()
  # openWakeWord floors at its clip's max - 80 dB, here: compare both above the higher floor
  floor = max(ref_db.max() - 80, speech_embedding.FLOOR_DB)
  ref = np.maximum(ref_db[:len(ours)], floor) / 10 + 2
  np.testing.assert_allclose(np.maximum(ours, floor / 10 + 2), ref, atol=2e-4)
  assert (ours > floor / 10 + 2).mean() > 0.5  # the floor is not what we compared
  np.testing.assert_array_equal(speech_embedding.log_mel(np.zeros(1600, np.float32)),
                                speech_embedding.SILENCE)


def test_jax_cnn_equals_the_onnx_embedding_model_on_every_window():
  x = _speechlike(3.2, 1)
  mel = speech_embedding.log_mel(x)
  n = len(mel) // speech_embedding.STRIDE
  ours = np.asarray(jax.jit(speech_embedding.embed)(mel[None]))[0]
  assert ours.shape == (n, speech_embedding.DIM)
  pad = speech_embedding.PAD_FRAMES
  framed = np.pad(mel, ((pad, pad), (0, 0)), constant_values=speech_embedding.SILENCE)
  windows = np.stack([framed[8 * i:8 * i + 76] for i in range(n)])[..., None]
  ref = _session("embedding_model.onnx").run(None, {"input_1": windows})[0].reshape(n, -1)
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("layer, reach", [("embedding", 4), ("pool4", 2)])
def test_a_token_reads_the_audio_around_it(layer, reach):
  """A change in token 10's frames moves tokens within `reach` of it on both sides and no
  others: the window is centred on its token."""
  rng = np.random.default_rng(5)
  mel = (rng.normal(size=(1, 8 * 20, 32)) + 6).astype(np.float32)
  bumped = mel.copy()
  bumped[0, 83:85] += 5.0
  moved = np.abs(np.asarray(speech_embedding.embed(jnp.asarray(bumped), layer=layer))
                 - np.asarray(speech_embedding.embed(jnp.asarray(mel), layer=layer))).sum(-1)[0]
  assert moved.shape == (20,)
  np.testing.assert_array_equal(np.nonzero(moved > 1e-3)[0], np.arange(10 - reach, 11 + reach))


def test_padding_frames_read_as_silence():
  mel = speech_embedding.log_mel(_speechlike(1.6, 2))[None]
  valid = np.zeros((1, mel.shape[1]), bool)
  valid[:, :80] = True
  masked = speech_embedding.embed(jnp.asarray(mel), jnp.asarray(valid))
  silenced = mel.copy()
  silenced[:, 80:] = speech_embedding.SILENCE
  np.testing.assert_allclose(masked, speech_embedding.embed(jnp.asarray(silenced)), atol=1e-5)


def check_windows_and_batching(cfg, units, model, audio: np.ndarray, feats: np.ndarray,
                               context: int) -> None:
  """The encoder quantized to 16 random directions gives a whole file's tokens in 40-token
  windows with `context` tokens either side; the tokenizer's batching with a longer clip
  changes nothing."""
  n = len(feats) // 8
  h = model.encode(jnp.asarray(feats[None]), jnp.ones((1, n), bool)).h_BxNxD
  proj = jnp.asarray(np.random.default_rng(3).normal(size=(cfg.model.d_model, 16)), jnp.float32)
  center = h[0].mean(0)

  @jax.jit
  def tokens(mel_BxFxM, valid_BxN):
    return jnp.argmax((model.encode(mel_BxFxM, valid_BxN > 0).h_BxNxD - center) @ proj, -1)

  whole = np.asarray(tokens(feats[None], np.ones((1, n), np.int32)))[0]
  assert len(set(whole.tolist())) > 5
  chunked = tokenizer.run_windows(tokenizer.plan_windows(n, 40, context), [feats], 8, tokens,
                                  batch=4, max_window=40)[0]
  np.testing.assert_array_equal(chunked, whole)

  _, params, vq_state = program.split(program.make_model(cfg, cfg.asr.units))
  tok = tokenizer.SpeechTokenizer(cfg, units, params, vq_state)
  x = audio[:20 * 1280]
  codes = tok.encode([x, np.tile(x, 2)])
  np.testing.assert_array_equal(codes[0], tok.encode([x])[0])
  assert len(codes[1]) == 40


@pytest.mark.parametrize("frontend, dim", [("speech_embedding", 96),
                                           ("speech_embedding_pool4", 384)])
def test_encoder_layout_reach_and_chunked_tokens(units, frontend, dim):
  """No conv stem: a layer norm and one linear map per 50 Hz phase on the frozen embeddings;
  a token reaches 380 ms further, and windows with that context give the whole file's tokens;
  batching with a longer clip changes nothing."""
  cfg = small_config(f"--config.model.frontend={frontend}")
  model = program.make_model(cfg, cfg.asr.units)
  assert model.conv1 is None and model.conv2 is None
  assert model.embed_proj.kernel.value.shape == (dim, cfg.model.pool, cfg.model.d_model)
  assert model.receptive_seconds == pytest.approx(2 * (0.2 + 0.02) + 0.38 + 0.08)

  audio = _speechlike(9.6, 3)
  mel = speech_embedding.log_mel(audio)
  context = math.ceil(model.receptive_seconds * 12.5)
  check_windows_and_batching(cfg, units, model, audio, mel, context)


def tiny_batch(cfg: config_lib.SpeechTokenizerConfig) -> dict[str, np.ndarray]:
  """Four clips of 10-31 tokens with random labels, in cfg's front end's features."""
  rng = np.random.default_rng(0)
  audios = [_speechlike(rng.integers(10, 32) * 0.08, s) for s in range(4)]
  labels = [rng.integers(1, 30, rng.integers(3, 8)).astype(np.int32) for _ in range(4)]
  m = cfg.model
  batch = input_lib.make_batch(audios, labels, 32, m.num_mels, 32 * m.ctc_upsample,
                               frontend=m.frontend)
  batch["audios"] = audios
  return batch


def train_steps(cfg: config_lib.SpeechTokenizerConfig, batch: dict[str, np.ndarray],
                convs: bool = False) -> list[float]:
  """Six steps on one batch: their CTC losses; the frozen front end has no parameters (the
  state has a log-mel conv stem only where `convs`)."""
  from sptlm import sharding
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  prog = program.build(cfg, mesh, cfg.asr.units)
  state = prog.init()
  names = {"/".join(map(str, path)) for path, _ in
           jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  assert any("embed_proj" in k for k in names) and any("conv1" in k for k in names) == convs
  batch = {k: v for k, v in batch.items() if k != "audios"}
  losses = []
  for _ in range(6):
    state, metrics = prog.step(state, prog.global_batch(batch))
    losses.append(float(jax.device_get(metrics)["loss_ctc"]))
  return losses


def test_train_steps_learn_and_leave_the_frozen_cnn_out_of_the_state():
  cfg = small_config("--config.train.steps=8", "--config.train.warmup_steps=1")
  batch = tiny_batch(cfg)
  assert batch["mel"].shape == (4, 256, 32)
  losses = train_steps(cfg, batch)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("overrides, match", [
    (["--config.model.num_mels=128"], "num_mels=32"),
    (["--config.model.mel_norm_seconds=1.0"], "mel_norm_seconds=0"),
    (["--config.model.frontend=wav2vec"], "is not one of"),
])
def test_config_errors(overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    small_config(*overrides)


def test_missing_openwakeword_is_a_one_line_error(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "openwakeword" else real(name, *a))
  with pytest.raises(speech_embedding.MissingWeights, match="openwakeword==0.4.0") as e:
    speech_embedding._model_file("embedding_model.onnx")
  assert "\n" not in str(e.value)
