"""model.frontend='moonshine_tiny': Moonshine tiny's frozen ASR encoder (the ONNX Runtime file
in moonshine-voice 0.0.73's wheel) in blocks, resampled to the 100 Hz frame grid; and
'moonshine_tiny_mel': that beside Whisper's log-mel, each through its own stem, summed."""

import dataclasses
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sptlm.speech import config as config_lib
from sptlm.speech import features, moonshine, program

import test_speech_model  # noqa: E402  (tests/ is on sys.path)
from test_speech_embedding import (_speechlike, check_windows_and_batching,  # noqa: E402
                                   tiny_batch, train_steps)
from test_speech_model import units  # noqa: F401,E402  (the module's fixture)

pytest.importorskip("onnxruntime")
CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / \
    "speech_tokenizer_robust_moonshine.py"
EXTRA = ["--config.model.layers_before_vq=2", "--config.model.conv_kernel=3",
         "--config.model.attention_window_seconds=0.2", "--config.model.init_std=0.2"]
BLOCK = moonshine.BLOCK_TOKENS * 1280
CONTEXT = moonshine.CONTEXT_TOKENS * 1280


def small_config(*extra: str) -> config_lib.SpeechTokenizerConfig:
  return config_lib.load(CONFIG, [*test_speech_model.SMALL, *EXTRA, *extra])


def test_a_block_of_features_is_the_encoder_output_resampled_to_100_hz():
  x = _speechlike(3.2, 0)
  feats = moonshine.features(x)
  assert feats.shape == (320, moonshine.DIM) and feats.dtype == np.float32
  enc = moonshine.encode_blocks(x[None])[0]  # one block: the whole clip, no context
  assert enc.shape == (moonshine.encoder_frames(len(x)), moonshine.DIM)
  # frame f (centre 160 f + 80) lies between encoder frames j and j + 1 (centres 384 j + 447.5)
  for f in (10, 100, 250):
    j = (160 * f + 80 - moonshine.CENTRE) / 384
    lo = math.floor(j)
    np.testing.assert_allclose(feats[f], enc[lo] + (j - lo) * (enc[lo + 1] - enc[lo]),
                               rtol=1e-5, atol=1e-5)


def test_a_clip_is_the_same_alone_and_in_a_padded_batch():
  short, long = _speechlike(2.0, 2), _speechlike(7.0, 3)
  batch = np.zeros((2, 7 * 16_000), np.float32)
  batch[0, :len(short)], batch[1] = short, long
  feats = moonshine.features(batch, np.array([len(short), len(long)]))
  whole_tokens = -(-len(short) // 1280) * 1280
  alone = moonshine.features(np.pad(short, (0, whole_tokens - len(short))))
  np.testing.assert_array_equal(feats[0, :len(alone)], alone)
  assert not feats[0, len(alone):].any()  # the padding past the clip's last token stays 0
  np.testing.assert_array_equal(feats[1], moonshine.features(long))


def test_blocks_bound_how_far_a_token_reads():
  x = _speechlike(14.0, 4)
  base = moonshine.features(x)
  far = x.copy()
  far[BLOCK + CONTEXT:] = _speechlike(14.0, 5)[BLOCK + CONTEXT:]
  changed = moonshine.features(far)
  np.testing.assert_array_equal(changed[:BLOCK // 160], base[:BLOCK // 160])
  assert np.abs(changed[BLOCK // 160:] - base[BLOCK // 160:]).max() > 0.1
  near = x.copy()  # inside block 0's right context: block 0 reads it
  near[BLOCK + CONTEXT - 1280:BLOCK + CONTEXT] = 0.0
  assert np.abs(moonshine.features(near)[:BLOCK // 160] - base[:BLOCK // 160]).max() > 1e-4
  early = x.copy()  # before block 1's left context: block 1 never reads it
  early[:BLOCK - CONTEXT] = 0.0
  np.testing.assert_array_equal(moonshine.features(early)[BLOCK // 160:], base[BLOCK // 160:])


def test_encoder_layout_reach_and_chunked_tokens(units):
  """No conv stem: a layer norm and one linear map on the 50 Hz frozen features; a token
  reaches a block and its context further; windows give the whole file's tokens; batching
  with a longer clip changes nothing."""
  cfg = small_config()
  model = program.make_model(cfg, cfg.asr.units)
  assert model.conv1 is None and model.conv2 is None
  assert model.embed_proj.kernel.value.shape == (moonshine.DIM, cfg.model.d_model)
  assert model.receptive_seconds == pytest.approx(2 * (0.2 + 0.02) + 6.4 + 0.08)

  audio = _speechlike(9.6, 6)
  feats = moonshine.features(audio)
  check_windows_and_batching(cfg, units, model, audio, feats, 8)


def test_train_steps_learn_and_leave_the_frozen_encoder_out_of_the_state():
  cfg = small_config("--config.train.steps=8", "--config.train.warmup_steps=1")
  batch = tiny_batch(cfg)
  assert batch["mel"].shape == (4, 256, moonshine.DIM)
  x = batch["audios"][0]
  first = np.pad(x, (0, -len(x) % 1280))  # whole tokens, as the tokenizer pads
  np.testing.assert_array_equal(batch["mel"][0, :len(first) // 160], moonshine.features(first))
  losses = train_steps(cfg, batch)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("overrides, match", [
    (["--config.model.num_mels=128"], "num_mels=288"),
    (["--config.model.mel_norm_seconds=1.0"], "mel_norm_seconds=1.0.*moonshine_tiny_mel"),
    (["--config.model.frontend=moonshine_tiny_mel"], "num_mels=416"),
    (["--config.model.frontend=moonshine_tiny_mel", "--config.model.num_mels=416",
      "--config.model.causal_stem=True"], "causal_stem=False"),
    (["--config.data.augment.enabled=True", "--config.data.augment.warp_prob=0.5"],
     "warp_prob=0"),
    (["--config.data.augment.enabled=True", "--config.data.augment.eq_prob=0.5"], "eq_prob=0"),
])
def test_config_errors(overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    small_config(*overrides)


def test_missing_moonshine_voice_is_a_one_line_error(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "moonshine_voice" else real(name, *a))
  with pytest.raises(moonshine.MissingWeights, match="moonshine-voice==0.0.73") as e:
    moonshine.model_file()
  assert "\n" not in str(e.value)


def test_small_moonshine_config_is_the_small_model_on_the_moonshine_recipe():
  configs = CONFIG.parent
  small = config_lib.load(configs / "speech_tokenizer_small.py")
  moon = config_lib.load(CONFIG)
  both = config_lib.load(configs / "speech_tokenizer_small_moonshine.py")
  assert both.model == dataclasses.replace(small.model, frontend="moonshine_tiny", num_mels=288)
  assert both.data == moon.data and not both.data.augment.enabled
  assert (both.vq, both.asr) == (small.vq, small.asr)
  assert both.train.learning_rate == small.train.learning_rate


HYBRID = ["--config.model.frontend=moonshine_tiny_mel", "--config.model.num_mels=416"]


def test_hybrid_features_are_moonshines_then_the_log_mel():
  x = _speechlike(2.4, 7)
  both = features.featurize(x[None], 416, "moonshine_tiny_mel")[0]
  assert both.shape == (240, 416)
  np.testing.assert_array_equal(both[:, :moonshine.DIM], moonshine.features(x))
  np.testing.assert_array_equal(both[:, moonshine.DIM:], features.log_mel(x, 128))


def test_hybrid_encoder_reads_both_stems_and_tokens_chunk_exactly(units):
  """Both stems shape the output (changing either part of the features changes it), the reach
  is Moonshine's, and windows give the whole file's tokens with the log-mel normalized."""
  cfg = small_config(*HYBRID, "--config.model.mel_norm_seconds=0.4")
  model = program.make_model(cfg, cfg.asr.units)
  d = cfg.model.d_model
  assert model.conv1.kernel.value.shape == (3, 128, d)
  assert model.embed_proj.kernel.value.shape == (moonshine.DIM, d)
  assert model.receptive_seconds == pytest.approx(2 * (0.2 + 0.02) + 6.4 + 0.08 + 0.2)

  audio = _speechlike(9.6, 6)
  feats = features.featurize(audio[None], 416, "moonshine_tiny_mel")[0]
  n = len(feats) // 8
  valid = jnp.ones((1, n), bool)

  def encode(f):
    return np.asarray(model.encode(jnp.asarray(f[None]), valid).h_BxNxD[0])

  base = encode(feats)
  for part in (slice(0, moonshine.DIM), slice(moonshine.DIM, None)):
    changed = feats.copy()
    changed[:, part] = 0.0
    assert np.abs(encode(changed) - base).max() > 1e-3, part

  check_windows_and_batching(cfg, units, model, audio, feats, 12)


def test_mel_stem_dropout_leaves_the_log_mel_out_of_that_utterance_only():
  """A left-out utterance reads nothing of its log-mel, as if the stem gave zeros; the others
  are as without dropout; the loss sees it the same way."""
  cfg = small_config(*HYBRID, "--config.model.mel_stem_dropout=0.5")
  model = program.make_model(cfg, cfg.asr.units)
  batch = tiny_batch(cfg)
  mel, valid = jnp.asarray(batch["mel"]), jnp.asarray(batch["valid"]) > 0
  other = mel.at[..., moonshine.DIM:].set(0.0)  # the same clips with another log-mel
  keep = jnp.asarray([True, False, True, False])

  def h(features, keep_B=None):
    return np.asarray(model.encode(features, valid, keep_B).h_BxNxD)

  full, dropped = h(mel), h(mel, keep)
  np.testing.assert_array_equal(h(mel, jnp.ones(4, bool)), full)
  np.testing.assert_array_equal(dropped[0::2], full[0::2])
  assert np.abs(dropped[1::2] - full[1::2]).max() > 1e-3
  np.testing.assert_array_equal(h(other, keep)[1::2], dropped[1::2])  # the log-mel unread

  graphdef, params, vq = program.split(model)
  inputs = {k: jnp.asarray(v) for k, v in batch.items() if k != "audios"}
  silent = jax.tree_util.tree_map(jnp.zeros_like, params["conv2"])
  loss = lambda p, keep_B=None: float(program.loss_fn(  # noqa: E731
      p, vq, graphdef, inputs, 0.25, jnp.asarray(True), mel_keep_B=keep_B)[0])
  assert loss(params, jnp.zeros(4, bool)) == pytest.approx(
      loss({**params, "conv2": silent}), rel=1e-6)
  assert loss(params, jnp.ones(4, bool)) == loss(params)


@pytest.mark.parametrize("overrides, match", [
    (["--config.model.mel_stem_dropout=0.3"], "mel_stem_dropout=0.3.*moonshine_tiny_mel"),
    ([*HYBRID, "--config.model.mel_stem_dropout=1.0"], r"within \[0, 1\)"),
])
def test_mel_stem_dropout_config_errors(overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    small_config(*overrides)


def test_hybrid_train_steps_learn_with_the_log_mel_stem_in_the_state():
  """With half the utterances' log-mel stems left out at random (model.mel_stem_dropout)."""
  cfg = small_config(*HYBRID, "--config.train.steps=8", "--config.train.warmup_steps=1",
                     "--config.model.mel_stem_dropout=0.5")
  batch = tiny_batch(cfg)
  assert batch["mel"].shape == (4, 256, 416)
  losses = train_steps(cfg, batch, convs=True)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_small_moonshine_mel_config_differs_only_in_the_front_end():
  configs = CONFIG.parent
  moon = config_lib.load(configs / "speech_tokenizer_small_moonshine.py")
  both = config_lib.load(configs / "speech_tokenizer_small_moonshine_mel.py")
  assert both.model == dataclasses.replace(moon.model, frontend="moonshine_tiny_mel",
                                           num_mels=416)
  assert (both.data, both.vq, both.asr, both.train) == (moon.data, moon.vq, moon.asr, moon.train)

