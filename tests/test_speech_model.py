"""The tokenizer model: Whisper layout, exactly 12.5 tokens per second, chunking without lost
or repeated tokens, the EMA codebook and its dead-code restart, block-causal streaming."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sptlm.model import nnx_compat
from sptlm.speech import config as config_lib
from sptlm.speech import features, program, tokenizer, vq
from sptlm.speech.units import Units, train_units

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "speech_tokenizer_tiny.py"
SMALL = ["--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.d_ff=64",
         "--config.model.layers_before_vq=1", "--config.model.layers_after_vq=1",
         "--config.vq.codebook_size=16", "--config.asr.unit_type=unigram",
         "--config.asr.units=32", "--config.model.conv_kernel=0",
         "--config.model.token_rate_layers=0"]  # tests opt in to the conv, 12.5 Hz layers


def small_config(*extra: str) -> config_lib.SpeechTokenizerConfig:
  return config_lib.load(CONFIG, [*SMALL, *extra])


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> Units:
  words = "the quick brown fox jumps over a lazy dog and then it sleeps all day long".split()
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(words, 8)) for _ in range(200)]
  return Units(train_units(texts, 32, tmp_path_factory.mktemp("units") / "u.model"))


def random_tokenizer(cfg: config_lib.SpeechTokenizerConfig, units: Units,
                     **kwargs) -> tokenizer.SpeechTokenizer:
  _, params, vq_state = program.split(program.make_model(cfg, cfg.asr.units))
  return tokenizer.SpeechTokenizer(cfg, units, params, vq_state, **kwargs)


def test_config_file_loads_and_round_trips():
  cfg = config_lib.load(CONFIG, ["--config.train.seed=3"])
  assert cfg.kind == "speech_tokenizer" and cfg.model.pool == 4 and cfg.model.num_mels == 128
  assert config_lib.from_json(config_lib.to_json(cfg)) == cfg
  with pytest.raises(config_lib.ConfigError, match="vq.codebook_sise"):
    config_lib.load(CONFIG, ["--config.vq.codebook_sise=3"])
  with pytest.raises(config_lib.ConfigError, match="block_causal_seconds"):
    config_lib.load(CONFIG, ["--config.model.block_causal_seconds=0.1"])


def test_parameter_layout_is_whisper_like(units):
  cfg = small_config()
  model = nnx.eval_shape(lambda: program.make_model(cfg, cfg.asr.units))
  _, params, codebook = nnx.split(model, nnx.Param, vq.CodebookState)
  names = {k: v.value.shape for k, v in nnx_compat.flat_paths(params).items()}
  d, m = cfg.model.d_model, cfg.model.num_mels
  assert names["conv1/kernel"] == (3, m, d) and names["conv2/kernel"] == (3, d, d)
  prefix = "layers_before_vq/stack/"
  for key in ("self_attn_layer_norm/scale", "self_attn/q_proj/kernel", "self_attn/q_proj/bias",
              "self_attn/k_proj/kernel", "self_attn/v_proj/bias", "self_attn/out_proj/kernel",
              "final_layer_norm/bias", "fc1/kernel", "fc2/bias"):
    assert prefix + key in names, key
  assert not any(k.endswith("k_proj/bias") for k in names)  # Whisper's k_proj has no bias
  assert "layer_norm/scale" in names and names["ctc_head/kernel"] == (d, cfg.asr.units + 1)
  assert {k: v.value.shape for k, v in nnx_compat.flat_paths(codebook).items()} == {
      "vq/codebook": (16, d), "vq/ema_counts": (16,), "vq/ema_sums": (16, d),
      "vq/unused_steps": (16,)}


@pytest.mark.parametrize("tokens", [1, 5, 33, 100])
def test_exactly_one_token_per_1280_samples(units, tokens):
  cfg = small_config("--config.model.max_seconds=2.56",  # 32-token windows: 100 is chunked
                     "--config.data.bucket_seconds=(2.56,)")
  tok = random_tokenizer(cfg, units, context_seconds=0.32)
  rng = np.random.default_rng(tokens)
  exact = (rng.normal(size=tokens * 1280) * 0.1).astype(np.float32)
  ragged = exact[:-300]  # a started token counts: ceil
  codes = tok.encode([exact, ragged])
  assert [len(c) for c in codes] == [tokens, tokens]
  assert all(c.dtype == np.int32 and c.min() >= 0 and c.max() < 16 for c in codes)
  assert len(tok.decode(codes)) == 2


def test_units_round_trip_and_ctc_greedy_decoding(tmp_path):
  texts = ["the cat sat on the mat", "a dog ran in the park", "we will go home now"] * 20
  for unit_type in ("char", "unigram"):
    u = Units(train_units(texts, 20, tmp_path / f"{unit_type}.model", unit_type))
    labels = u.labels("the dog sat")
    assert u.text(labels) == "the dog sat" and labels.min() >= 1 and u.size <= 20
    frames = np.concatenate([[0, labels[0], labels[0], 0], labels[1:], [0, 0]])
    assert u.greedy(frames) == "the dog sat"  # repeats merge, blanks (0) drop
  assert u.greedy(np.zeros(5, np.int32)) == ""


def test_windows_partition_the_tokens():
  for num in (1, 31, 32, 33, 64, 100, 1001):
    for window, context in ((32, 4), (32, 0), (375, 25)):
      ws = tokenizer.plan_windows(num, window, context)
      kept = [i for w in ws for i in range(w.keep_start, w.keep_stop)]
      assert kept == list(range(num))
      for w in ws:
        assert w.start <= w.keep_start < w.keep_stop <= w.stop and w.stop - w.start <= window
        assert w.keep_start - w.start == min(context, w.keep_start)


def test_chunked_encoding_equals_unchunked_at_chunk_edges(units):
  """Features of the whole file, windows with context, kept centres: a token whose receptive
  field fits in the context comes out the same, with none lost or repeated at an edge."""
  cfg = small_config()
  model = program.make_model(cfg, cfg.asr.units)

  @jax.jit
  def local_tokens(mel_BxFxM, valid_BxN):  # the conv stem + pooling + VQ: a local encoder
    x = jax.nn.gelu(model.conv2(jax.nn.gelu(model.conv1(mel_BxFxM))))
    h = x.reshape(x.shape[0], valid_BxN.shape[1], 4, -1).mean(2)
    return jnp.argmax(h @ proj, axis=-1)

  rng = np.random.default_rng(0)
  proj = jnp.asarray(rng.normal(size=(cfg.model.d_model, 16)), jnp.float32)
  n = 150
  t = np.arange(640) / 16_000  # 40 ms tones of random pitch and loudness
  audio = np.concatenate([rng.uniform(0.01, 0.5) * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
                          for _ in range(n * 2)]).astype(np.float32)
  mel = features.log_mel(audio)
  whole = np.asarray(local_tokens(mel[None], np.ones((1, n), np.int32)))[0]
  assert len(set(whole.tolist())) > 3
  for window, context in ((32, 2), (40, 3), (64, 1)):
    ws = tokenizer.plan_windows(n, window, context)
    assert len(ws) > 2
    got = tokenizer.run_windows(ws, [mel], 8, local_tokens, batch=4, max_window=window)[0]
    np.testing.assert_array_equal(got, whole)


def test_vq_straight_through_and_commitment(units):
  cfg = small_config()
  model = program.make_model(cfg, cfg.asr.units)
  h = jax.random.normal(jax.random.key(0), (2, 5, cfg.model.d_model))
  out = model.vq(h)
  e = model.vq.lookup(out.codes_BxN)
  np.testing.assert_allclose(out.quantized_BxNxD, e, atol=1e-5)  # forward: the code vector
  grad = jax.grad(lambda h: jnp.sum(model.vq(h).quantized_BxNxD * 3.0))(h)
  np.testing.assert_allclose(grad, 3.0 * np.ones_like(h))  # backward: identity
  np.testing.assert_allclose(out.commitment_BxN, jnp.mean((h - e) ** 2, -1), rtol=1e-5)
  dist = jnp.sum((h[:, :, None] - model.vq.codebook.value) ** 2, -1)
  np.testing.assert_array_equal(out.codes_BxN, jnp.argmin(dist, -1))


def test_ema_update_and_dead_code_restart():
  k, d = 4, 3
  state = {"codebook": jnp.zeros((k, d)), "ema_counts": jnp.asarray([2.0, 1.0, 1.0, 0.0]),
           "ema_sums": jnp.ones((k, d)), "unused_steps": jnp.asarray([5, 0, 1, 3])}
  h = jnp.asarray([[[1.0, 2, 3], [3.0, 2, 1], [5.0, 5, 5], [9.0, 9, 9]]])
  codes = jnp.asarray([[0, 0, 1, 1]])
  valid = jnp.asarray([[1, 1, 1, 0]])  # the last token is padding: ignored
  new, stats = vq.ema_update(state, h, codes, valid, decay=0.5, restart_after=5,
                             key=jax.random.key(0))
  np.testing.assert_allclose(new["ema_counts"], [0.5 * 2 + 0.5 * 2, 0.5 + 0.5, 0.5, 0.0])
  np.testing.assert_allclose(new["ema_sums"][0], 0.5 * 1 + 0.5 * np.asarray([4.0, 4, 4]))
  np.testing.assert_allclose(new["codebook"][0], new["ema_sums"][0] / 2.0)
  np.testing.assert_allclose(new["codebook"][1], [3.0, 3, 3])  # (0.5 + 2.5) / 1
  np.testing.assert_allclose(new["codebook"][2], [1.0, 1, 1])  # unused: sums / counts
  np.testing.assert_allclose(new["codebook"][3], 0.0)  # unused 4 steps, never seen: kept
  np.testing.assert_array_equal(new["unused_steps"], [0, 0, 2, 4])
  assert float(stats.restarted) == 0 and float(stats.usage) == 1.0
  np.testing.assert_allclose(stats.perplexity, np.exp(-(2 / 3 * np.log(2 / 3)
                                                        + 1 / 3 * np.log(1 / 3))), rtol=1e-5)

  state["unused_steps"] = jnp.asarray([5, 0, 1, 4])  # code 3 reaches 5 steps unused: restart
  new, stats = vq.ema_update(state, h, codes, valid, decay=0.5, restart_after=5,
                             key=jax.random.key(0))
  assert float(stats.restarted) == 1 and int(new["unused_steps"][3]) == 0
  seed = np.asarray(new["codebook"][3])
  assert any(np.allclose(seed, v) for v in np.asarray(h[0, :3]))  # a real (unpadded) output
  mean = float(jnp.mean(jnp.asarray([2.0, 1.0, 0.5, 0.0])))
  assert float(new["ema_counts"][3]) == pytest.approx(mean)
  np.testing.assert_allclose(new["ema_sums"][3] / new["ema_counts"][3], seed, rtol=1e-5)


def test_first_step_seeds_the_whole_codebook_from_data(units):
  cfg = small_config()
  _, _, vq_state = program.split(program.make_model(cfg, cfg.asr.units))
  state = vq_state["vq"]
  k, d = state["codebook"].shape
  h = 100.0 + jax.random.normal(jax.random.key(1), (2, 6, d))  # far from the random init
  codes = jnp.zeros((2, 6), jnp.int32)
  new, stats = vq.ema_update(state, h, codes, jnp.ones((2, 6)), decay=0.99, restart_after=20,
                             key=jax.random.key(2))
  assert float(stats.restarted) == k - 1  # all but the code in use
  assert np.all(np.abs(np.asarray(new["codebook"]) - 100.0) < 10)


def test_block_causal_tokens_see_no_future_audio(units):
  cfg = small_config("--config.model.block_causal_seconds=0.32", "--config.model.causal_stem=True")
  model = program.make_model(cfg, cfg.asr.units)
  n, block = 12, 4  # 0.32 s = 4 tokens per block
  mel = jax.random.normal(jax.random.key(0), (1, n * 8, cfg.model.num_mels))
  valid = jnp.ones((1, n), bool)

  def h_of_first_block(mel):
    return jnp.sum(model.encode(mel, valid).h_BxNxD[:, :block] ** 2)

  g = np.asarray(jax.grad(h_of_first_block)(mel))[0]
  assert np.abs(g[:block * 8]).sum() > 0
  assert np.abs(g[block * 8:]).max() == 0  # nothing from later audio
  g_post = jax.grad(lambda q: jnp.sum(model.ctc_logits(q, valid)[:, :block] ** 2))(
      jax.random.normal(jax.random.key(1), (1, n, cfg.model.d_model)))
  assert np.abs(np.asarray(g_post)[0, block:]).max() == 0

  bidi = program.make_model(small_config(), 32)
  g = jax.grad(lambda m: jnp.sum(bidi.encode(m, valid).h_BxNxD[:, :block] ** 2))(mel)
  assert np.abs(np.asarray(g)[0, block * 8:]).max() > 0  # the default sees the whole window


def test_padding_does_not_change_real_tokens(units):
  cfg = small_config()
  tok = random_tokenizer(cfg, units)
  rng = np.random.default_rng(5)
  x = (rng.normal(size=20 * 1280) * 0.2).astype(np.float32)
  alone = tok.encode([x])[0]
  with_long = tok.encode([x, np.tile(x, 2)])[0]  # batched with a longer input: padded
  np.testing.assert_array_equal(alone, with_long)


def test_batch_plan_is_seeded_buckets_and_short_first():
  from sptlm.speech import input as input_lib
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 96, 500)
  shapes = input_lib.bucket_shapes((2.56, 3.84, 7.68), 32.0, 2)
  assert shapes == [(12, 32), (8, 48), (4, 96)]  # batch sizes: multiples of the 2 devices
  plan = input_lib.plan_batches(tokens, shapes, seed=3, epochs=2, short_first=True)
  assert plan == input_lib.plan_batches(tokens, shapes, seed=3, epochs=2, short_first=True)
  per_epoch = len(plan) // 2
  first, second = plan[:per_epoch], plan[per_epoch:]
  assert [b for b, _ in first] == sorted(b for b, _ in first)  # SortaGrad: short first
  assert [b for b, _ in second] != sorted(b for b, _ in second)  # then shuffled
  for bucket, members in plan:
    b, n = shapes[bucket]
    assert len(members) == b and all(tokens[i] <= n for i in members)
    assert bucket == 0 or all(tokens[i] > shapes[bucket - 1][1] for i in members)
  assert len({i for _, m in first for i in m}) == sum(len(m) for _, m in first)  # no repeats


def test_sharded_train_step_matches_single_device(units):
  from sptlm import sharding
  from sptlm.speech import input as input_lib
  rng = np.random.default_rng(0)
  audios = [(rng.normal(size=rng.integers(10, 32) * 1280) * 0.2).astype(np.float32)
            for _ in range(4)]
  labels = [rng.integers(1, 30, rng.integers(3, 8)).astype(np.int32) for _ in range(4)]
  cfg = small_config("--config.train.steps=4", "--config.train.warmup_steps=1")
  batch = input_lib.make_batch(audios, labels, 32, cfg.model.num_mels,
                               32 * cfg.model.ctc_upsample)
  results = []
  for data, fsdp in ((1, 1), (2, 2)):
    mesh = sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": 1},
                              jax.devices()[:data * fsdp])
    prog = program.build(cfg, mesh, cfg.asr.units)
    state = prog.init()
    for _ in range(2):
      state, metrics = prog.step(state, prog.global_batch(batch))
    results.append((jax.device_get(metrics), jax.device_get(state["vq"])))
  (m1, vq1), (m4, vq4) = results
  for key in ("loss", "loss_ctc", "grad_norm", "code_perplexity"):
    np.testing.assert_allclose(m4[key], m1[key], rtol=2e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), vq4, vq1)


def test_attention_window_bounds_what_a_token_depends_on(units):
  """With model.attention_window_seconds, token i's code depends only on audio within the
  model's receptive_seconds of it: what lets windows with that much context match the whole."""
  cfg = small_config("--config.model.attention_window_seconds=0.16",
                     "--config.model.layers_before_vq=2")
  model = program.make_model(cfg, cfg.asr.units)
  n, i = 40, 20
  mel = jax.random.normal(jax.random.key(0), (1, n * 8, cfg.model.num_mels))
  valid = jnp.ones((1, n), bool)
  g = np.asarray(jax.grad(lambda m: jnp.sum(model.encode(m, valid).h_BxNxD[:, i] ** 2))(mel))[0]
  frames = np.nonzero(np.abs(g).sum(-1))[0]  # 100 Hz mel frames token i's vector depends on
  reach = model.receptive_seconds
  assert reach == pytest.approx(2 * 0.16 + 0.03 + 0.08)
  assert frames.min() >= (i * 0.08 - reach) * 100 - 1e-6
  assert frames.max() < ((i + 1) * 0.08 + reach) * 100 + 1e-6
  assert frames.min() < i * 8 - 16 and frames.max() > (i + 1) * 8 + 16  # yet it does look around
  full = program.make_model(small_config("--config.model.layers_before_vq=2",
                                      "--config.model.attention_window_seconds=0.0"),
                         cfg.asr.units)
  assert full.receptive_seconds == float("inf")


def test_factorized_unit_sphere_codes_train_and_ignore_scale(units):
  """vq.code_dim + vq.normalize: an 8-dim code space on the unit sphere; a token's code depends
  on the direction of the projected encoder output only, and the train step reaches the
  projections and inter-CTC head with finite gradients."""
  from sptlm.speech import input as input_lib
  from sptlm import sharding
  cfg = small_config("--config.vq.code_dim=8", "--config.vq.normalize=True",
                     "--config.asr.inter_ctc_weight=0.5", "--config.train.steps=4",
                     "--config.train.warmup_steps=1", "--config.vq.warmup_steps=0")
  model = program.make_model(cfg, cfg.asr.units)
  assert model.vq.codebook.value.shape == (16, 8)
  z = jax.random.normal(jax.random.key(0), (2, 5, 8))
  np.testing.assert_array_equal(model.vq.nearest(z), model.vq.nearest(3.7 * z))
  out = model.vq(z)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out.quantized_BxNxD), axis=-1), 1.0,
                             rtol=1e-5)
  rng = np.random.default_rng(1)
  audios = [(rng.normal(size=24 * 1280) * 0.2).astype(np.float32) for _ in range(2)]
  labels = [rng.integers(1, 30, 5).astype(np.int32) for _ in range(2)]
  batch = input_lib.make_batch(audios, labels, 32, cfg.model.num_mels, 32 * cfg.model.ctc_upsample)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  prog = program.build(cfg, mesh, cfg.asr.units)
  state = prog.init()
  before = jax.device_get(state["params"])
  for _ in range(2):  # the learning rate warms up from 0 at step 0
    state, metrics = prog.step(state, prog.global_batch(batch))
  after = jax.device_get(state["params"])
  m = jax.device_get(metrics)
  assert np.isfinite(m["loss"]) and m["loss_inter_ctc"] > 0
  for name in ("vq_in", "vq_out", "inter_ctc_head"):
    assert np.abs(after[name]["kernel"] - before[name]["kernel"]).max() > 0, name



def test_tokenizer_context_covers_the_windowed_receptive_field(units):
  """Windows of a long file get at least the receptive field of a token as context."""
  cfg = small_config("--config.model.attention_window_seconds=0.2",
                     "--config.model.layers_before_vq=2")
  assert random_tokenizer(cfg, units, context_seconds=0.0).context == 7  # ceil(0.51 s * 12.5)
  assert random_tokenizer(cfg, units).context == 25  # the 2 s default, when it is wider
  wide = small_config("--config.model.attention_window_seconds=1.0",
                      "--config.model.layers_before_vq=2")
  assert random_tokenizer(wide, units).context == 27  # 2.11 s > the 2 s default
  full = small_config("--config.model.attention_window_seconds=0.0")
  assert random_tokenizer(full, units, context_seconds=0.0).context == 0


def test_conformer_conv_module_reach_and_padding(units):
  """model.conv_kernel adds a depthwise convolution to every layer: a token's reach grows by
  kernel // 2 frames a layer, and padding frames never leak into real ones."""
  cfg = small_config("--config.model.attention_window_seconds=0.16",
                     "--config.model.layers_before_vq=2", "--config.model.conv_kernel=5")
  model = program.make_model(cfg, cfg.asr.units)
  assert model.receptive_seconds == pytest.approx(2 * (0.16 + 0.04) + 0.03 + 0.08)
  n, i = 40, 20
  mel = jax.random.normal(jax.random.key(0), (1, n * 8, cfg.model.num_mels))
  valid = jnp.ones((1, n), bool)
  g = np.asarray(jax.grad(lambda m: jnp.sum(model.encode(m, valid).h_BxNxD[:, i] ** 2))(mel))[0]
  frames = np.nonzero(np.abs(g).sum(-1))[0]
  reach = model.receptive_seconds
  assert frames.min() >= (i * 0.08 - reach) * 100 - 1e-6
  assert frames.max() < ((i + 1) * 0.08 + reach) * 100 + 1e-6
  assert frames.min() < (i * 0.08 - 0.35) * 100  # beyond the attention alone (0.32 s + stem)
  tok = random_tokenizer(cfg, units)
  x = (np.random.default_rng(5).normal(size=20 * 1280) * 0.2).astype(np.float32)
  np.testing.assert_array_equal(tok.encode([x])[0], tok.encode([x, np.tile(x, 2)])[0])


def test_token_rate_layers_run_at_12_5_hz_then_upsample(units):
  """model.token_rate_layers: layers above the VQ at the token rate, then a per-phase
  projection gives each token ctc_upsample distinct CTC frames; padding tokens change nothing
  real, and too many such layers is a config error naming the key."""
  cfg = small_config("--config.model.layers_after_vq=2", "--config.model.token_rate_layers=1")
  model = program.make_model(cfg, cfg.asr.units)
  assert model.token_rate_layers.num == 1 and model.layers_after_vq.num == 1
  up = cfg.model.ctc_upsample
  q = jax.random.normal(jax.random.key(0), (1, 12, cfg.model.d_model))
  valid = jnp.arange(12)[None] < 9
  logits = np.asarray(model.ctc_logits(q, valid))
  assert logits.shape == (1, 12 * up, cfg.asr.units + 1)
  frames = logits[0, :9 * up].reshape(9, up, -1)
  assert np.abs(frames[:, 0] - frames[:, 1]).max() > 1e-3  # the phases differ
  q2 = q.at[:, 9:].set(5.0)  # other padding values
  np.testing.assert_allclose(np.asarray(model.ctc_logits(q2, valid))[0, :9 * up],
                             logits[0, :9 * up], atol=1e-5)
  with pytest.raises(config_lib.ConfigError, match="token_rate_layers"):
    small_config("--config.model.token_rate_layers=2")


def test_rope_below_the_vq_makes_chunked_tokens_equal_whole_file_tokens(units):
  """model.positions=rope: with windowed attention a token depends on nearby audio only, not
  on where it sits in the window, so windows with the receptive field as context give the
  whole file's tokens; Whisper's absolute sinusoids do not."""
  rng = np.random.default_rng(3)
  t = np.arange(640) / 16_000
  audio = np.concatenate([rng.uniform(0.01, 0.5) * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
                          for _ in range(240)]).astype(np.float32)  # 120 tokens of tones
  mel = features.log_mel(audio)
  agreement = {}
  for positions in ("rope", "sinusoid"):
    cfg = small_config("--config.model.attention_window_seconds=0.2",
                       "--config.model.layers_before_vq=2", "--config.model.conv_kernel=3",
                       f"--config.model.positions={positions}", "--config.model.init_std=0.2")
    model = program.make_model(cfg, cfg.asr.units)
    proj = jnp.asarray(rng.normal(size=(cfg.model.d_model, 16)), jnp.float32)
    center = model.encode(mel[None], jnp.ones((1, 120), bool)).h_BxNxD[0].mean(0)

    @jax.jit
    def tokens(mel_BxFxM, valid_BxN):  # the encoder, quantized to 16 random directions
      h = model.encode(mel_BxFxM, valid_BxN > 0).h_BxNxD - center
      return jnp.argmax(h @ proj, axis=-1)

    whole = np.asarray(tokens(mel[None], np.ones((1, 120), np.int32)))[0]
    assert len(set(whole.tolist())) > 5
    context = math.ceil(model.receptive_seconds * 12.5)
    chunked = tokenizer.run_windows(tokenizer.plan_windows(120, 40, context), [mel], 8, tokens,
                                    batch=4, max_window=40)[0]
    agreement[positions] = np.mean(chunked == whole)
  assert agreement["rope"] == 1.0, agreement
  assert agreement["sinusoid"] < 0.9, agreement


def test_mel_norm_removes_a_fixed_colour_and_keeps_windows_exact(units):
  """model.mel_norm_seconds: a constant offset per mel bin (a fixed equalizer) changes nothing
  the encoder sees; a token depends on audio only within the (widened) receptive field, so
  windows with that much context give the whole file's tokens; padding changes nothing real."""
  rng = np.random.default_rng(4)
  t = np.arange(640) / 16_000
  audio = np.concatenate([rng.uniform(0.01, 0.5) * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
                          for _ in range(240)]).astype(np.float32)  # 120 tokens of tones
  mel = features.log_mel(audio)
  cfg = small_config("--config.model.attention_window_seconds=0.2",
                     "--config.model.layers_before_vq=2", "--config.model.conv_kernel=3",
                     "--config.model.positions=rope", "--config.model.init_std=0.2",
                     "--config.model.mel_norm_seconds=1.0")
  model = program.make_model(cfg, cfg.asr.units)
  assert model.receptive_seconds == pytest.approx(2 * (0.2 + 0.02) + 0.03 + 0.08 + 0.5)
  valid = jnp.ones((1, 120), bool)
  colour = jnp.asarray(rng.normal(size=cfg.model.num_mels), jnp.float32)
  h = model.encode(mel[None], valid).h_BxNxD
  np.testing.assert_allclose(model.encode(mel[None] + colour, valid).h_BxNxD, h, atol=1e-4)
  plain = program.make_model(small_config("--config.model.init_std=0.2"), cfg.asr.units)
  assert np.abs(plain.encode(mel[None] + colour, valid).h_BxNxD
                - plain.encode(mel[None], valid).h_BxNxD).max() > 1e-2

  i = 60
  g = np.asarray(jax.grad(lambda m: jnp.sum(model.encode(m, valid).h_BxNxD[:, i] ** 2))(
      jnp.asarray(mel[None])))[0]
  size = np.abs(g).sum(-1)  # the prefix sums' gradients cancel beyond the window up to rounding
  frames = np.nonzero(size > 1e-5 * size.max())[0]
  reach = model.receptive_seconds
  assert frames.min() >= (i * 0.08 - reach) * 100 - 1e-6
  assert frames.max() < ((i + 1) * 0.08 + reach) * 100 + 1e-6

  proj = jnp.asarray(rng.normal(size=(cfg.model.d_model, 16)), jnp.float32)
  center = h[0].mean(0)

  @jax.jit
  def tokens(mel_BxFxM, valid_BxN):  # the encoder, quantized to 16 random directions
    return jnp.argmax((model.encode(mel_BxFxM, valid_BxN > 0).h_BxNxD - center) @ proj, -1)

  whole = np.asarray(tokens(mel[None], np.ones((1, 120), np.int32)))[0]
  assert len(set(whole.tolist())) > 5
  context = math.ceil(reach * 12.5)
  chunked = tokenizer.run_windows(tokenizer.plan_windows(120, 40, context), [mel], 8, tokens,
                                  batch=4, max_window=40)[0]
  np.testing.assert_array_equal(chunked, whole)
  tok = random_tokenizer(cfg, units)
  x = audio[:20 * 1280]
  np.testing.assert_array_equal(tok.encode([x])[0], tok.encode([x, np.tile(x, 2)])[0])


@pytest.mark.parametrize("overrides, match", [
    (["--config.model.mel_norm_seconds=0.015"], "multiple of 0.02"),
    (["--config.model.mel_norm_seconds=-1.0"], "mel_norm_seconds"),
    (["--config.model.mel_norm_seconds=1.0", "--config.model.block_causal_seconds=0.32"],
     "causal"),
])
def test_mel_norm_config_errors(overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    small_config(*overrides)
