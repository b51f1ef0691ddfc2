"""Incremental decoding: the KV cache reproduces the full forward, and generation samples right."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sptlm import config
from sptlm.model import decode, transformer

VOCAB = 64
ATOL = 1e-5
FULL_LEN = 16  # reference forwards run at one length (one compile); causality ignores the tail
# Two layouts that exercise every decode-path option: Llama-like, and GLM-4-like.
VARIANTS = {
    "llama": {},
    "glm": dict(qkv_bias=True, rope_style="interleaved", rope_fraction=0.5, tie_embeddings=False),
}


def _build(overrides: dict) -> transformer.Transformer:
  """A tiny float32 model with peaky logits (so argmax has no near-ties) and nonzero biases."""
  base = config.load("configs/tiny.py").model
  cfg = dataclasses.replace(base, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                            head_dim=16, d_ff=64, init_std=0.3, dtype="float32",
                            param_dtype="float32", **overrides)
  model = transformer.build(cfg, VOCAB, seed=0)
  if cfg.qkv_bias:  # zero-initialized; randomize so a bias mistake would show
    attn = model.layers.attn
    for i, name in enumerate(("q_bias", "k_bias", "v_bias")):
      var = getattr(attn, name)
      var.value = 0.5 * jax.random.normal(jax.random.key(i + 1), var.value.shape)
  return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request: pytest.FixtureRequest) -> transformer.Transformer:
  return _build(VARIANTS[request.param])


@pytest.fixture(scope="module")
def llama() -> transformer.Transformer:
  return _build(VARIANTS["llama"])


@jax.jit
def _forward(graphdef: nnx.GraphDef, state: nnx.State, tokens_BxL: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(tokens_BxL)


@jax.jit
def _step(graphdef: nnx.GraphDef, state: nnx.State, tokens_BxL: jax.Array,
          positions_BxL: jax.Array, cache: transformer.KVCache
          ) -> tuple[jax.Array, transformer.KVCache]:
  segment_ids_BxL = jnp.ones_like(tokens_BxL)
  return nnx.merge(graphdef, state).decode(tokens_BxL, positions_BxL, segment_ids_BxL, cache)


def full_logits(model: transformer.Transformer, tokens_L: np.ndarray) -> np.ndarray:
  """[L, V] logits of one unpadded sequence through the plain forward."""
  n = len(tokens_L)
  buf_1xL = np.zeros((1, FULL_LEN), np.int32)  # trailing tokens cannot change causal logits
  buf_1xL[0, :n] = tokens_L
  return np.asarray(_forward(*nnx.split(model), jnp.asarray(buf_1xL))[0, :n])


def _rows(lengths: list[int], seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, n) for n in lengths]


def _greedy_reference(model: transformer.Transformer, prompt: np.ndarray, n: int) -> list[int]:
  """Argmax decoding that recomputes the whole sequence every step: no cache involved."""
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(np.argmax(full_logits(model, np.array(seq))[-1])))
  return seq[len(prompt):]


# ---------------------------------------------------------------------------------------------
# The cache reproduces the full forward.


def test_cached_decode_matches_full_forward(model: transformer.Transformer) -> None:
  (seq,) = _rows([11], seed=0)
  p = 5
  want_LxV = full_logits(model, seq)
  cache, last_1xV, next_pos_1 = decode.prefill(model, [seq[:p]], max_len=16)
  np.testing.assert_allclose(last_1xV[0], want_LxV[p - 1], atol=ATOL, rtol=0)
  assert int(next_pos_1[0]) == p
  graphdef, state = nnx.split(model)
  for t in range(p, len(seq)):
    logits_1x1xV, cache = _step(graphdef, state, jnp.array([[seq[t]]]), jnp.array([[t]]), cache)
    np.testing.assert_allclose(logits_1x1xV[0, 0], want_LxV[t], atol=ATOL, rtol=0,
                               err_msg=f"position {t}")
  assert int(cache.index) == len(seq)


def test_left_padded_batch_matches_each_row_alone(model: transformer.Transformer) -> None:
  lengths, steps = [3, 7, 5], 4
  rows = _rows([n + steps for n in lengths], seed=1)
  cache, last_BxV, next_pos_B = decode.prefill(
      model, [r[:n] for r, n in zip(rows, lengths)], max_len=7 + steps)
  np.testing.assert_array_equal(next_pos_B, lengths)
  want = [full_logits(model, r) for r in rows]
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(last_BxV[b], want[b][n - 1], atol=ATOL, rtol=0,
                               err_msg=f"row {b} prefill")
  graphdef, state = nnx.split(model)
  for s in range(steps):
    tokens_Bx1 = jnp.array([[r[n + s]] for r, n in zip(rows, lengths)])
    positions_Bx1 = jnp.array([[n + s] for n in lengths])
    logits_Bx1xV, cache = _step(graphdef, state, tokens_Bx1, positions_Bx1, cache)
    for b, n in enumerate(lengths):
      np.testing.assert_allclose(logits_Bx1xV[b, 0], want[b][n + s], atol=ATOL, rtol=0,
                                 err_msg=f"row {b} step {s}")


def test_left_pad_layout() -> None:
  got = decode.left_pad([[7, 8, 9], [5]])
  np.testing.assert_array_equal(got.tokens_BxP, [[7, 8, 9], [0, 0, 5]])
  np.testing.assert_array_equal(got.segment_ids_BxP, [[1, 1, 1], [0, 0, 1]])
  np.testing.assert_array_equal(got.positions_BxP, [[0, 1, 2], [0, 0, 0]])
  np.testing.assert_array_equal(got.lengths_B, [3, 1])
  # A right-padded array with lengths gives the same layout.
  same = decode.left_pad(np.array([[7, 8, 9], [5, 3, 3]]), lengths=[3, 1])
  for a, b in zip(got, same):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Generation.


PROMPT_LENGTHS = [2, 6, 4]
NEW = 6


def test_greedy_generate_matches_argmax_loop(model: transformer.Transformer) -> None:
  prompts = _rows(PROMPT_LENGTHS, seed=2)
  out = decode.generate(model, prompts, max_new_tokens=NEW, rng=jax.random.key(0))
  assert out.tokens.shape == (3, NEW) and out.tokens.dtype == jnp.int32
  np.testing.assert_array_equal(out.lengths, [NEW] * 3)
  for b, prompt in enumerate(prompts):
    want = _greedy_reference(model, prompt, NEW)
    assert out.tokens[b].tolist() == want, f"row {b}"
    # Logprobs are the model's own, at each generated position.
    logp_LxV = jax.nn.log_softmax(full_logits(model, np.concatenate([prompt, want])))
    want_logp = [logp_LxV[len(prompt) - 1 + t, tok] for t, tok in enumerate(want)]
    np.testing.assert_allclose(out.logprobs[b], want_logp, atol=ATOL, rtol=0)


def test_array_prompts_with_lengths_match_list(llama: transformer.Transformer) -> None:
  prompts = _rows(PROMPT_LENGTHS, seed=2)
  array_BxP = np.full((3, 6), 3)
  for b, p in enumerate(prompts):
    array_BxP[b, :len(p)] = p
  a = decode.generate(llama, prompts, max_new_tokens=NEW, rng=jax.random.key(0))
  b = decode.generate(llama, array_BxP, lengths=PROMPT_LENGTHS, max_new_tokens=NEW,
                      rng=jax.random.key(0), max_len=20)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_stop_tokens_end_rows_and_pad_after(llama: transformer.Transformer) -> None:
  prompts = _rows(PROMPT_LENGTHS, seed=2)
  free = np.asarray(decode.generate(llama, prompts, max_new_tokens=NEW,
                                    rng=jax.random.key(0)).tokens)
  stop = int(free[0, 2])
  out = decode.generate(llama, prompts, max_new_tokens=NEW, rng=jax.random.key(0),
                        stop_tokens=(stop,), pad_id=-1)
  for b in range(3):
    hits = np.flatnonzero(free[b] == stop)
    n = int(hits[0]) + 1 if hits.size else NEW
    assert int(out.lengths[b]) == n, f"row {b}"
    assert out.tokens[b].tolist() == free[b, :n].tolist() + [-1] * (NEW - n), f"row {b}"
    assert np.all(np.asarray(out.logprobs[b, n:]) == 0.0)
  assert int(out.lengths[0]) <= 3


def test_all_rows_stopped_ends_the_loop(llama: transformer.Transformer) -> None:
  prompts = _rows(PROMPT_LENGTHS, seed=2)
  free = np.asarray(decode.generate(llama, prompts, max_new_tokens=NEW,
                                    rng=jax.random.key(0)).tokens)
  out = decode.generate(llama, prompts, max_new_tokens=NEW, rng=jax.random.key(0),
                        stop_tokens=tuple(int(t) for t in set(free[:, 0])), pad_id=-1)
  np.testing.assert_array_equal(out.lengths, [1, 1, 1])
  np.testing.assert_array_equal(out.tokens[:, 0], free[:, 0])
  assert np.all(np.asarray(out.tokens[:, 1:]) == -1)


# ---------------------------------------------------------------------------------------------
# Sampling.


def test_tiny_top_p_is_greedy(llama: transformer.Transformer) -> None:
  prompts = _rows(PROMPT_LENGTHS, seed=3)
  greedy = decode.generate(llama, prompts, max_new_tokens=NEW, rng=jax.random.key(0))
  for seed in range(3):
    nucleus = decode.generate(llama, prompts, max_new_tokens=NEW, rng=jax.random.key(seed),
                              temperature=2.0, top_p=1e-6)
    np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)


def test_temperature_sampling_is_deterministic_per_rng(llama: transformer.Transformer) -> None:
  prompts = _rows(PROMPT_LENGTHS, seed=3)

  def run(seed: int) -> np.ndarray:
    return np.asarray(decode.generate(llama, prompts, max_new_tokens=NEW,
                                      rng=jax.random.key(seed), temperature=3.0).tokens)

  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


def test_sample_logits_respects_the_nucleus() -> None:
  sample = jax.jit(decode.sample_logits)
  probs_V = np.array([0.5, 0.3, 0.15, 0.05])
  logits_BxV = jnp.broadcast_to(jnp.log(jnp.asarray(probs_V, jnp.float32)), (4000, 4))
  key = jax.random.key(0)
  assert set(np.asarray(sample(logits_BxV, key, 1.0, 0.7)).tolist()) == {0, 1}
  assert set(np.asarray(sample(logits_BxV, key, 1.0, 0.85)).tolist()) == {0, 1, 2}
  full_B = np.asarray(sample(logits_BxV, key, 1.0, 1.0))
  np.testing.assert_allclose(np.bincount(full_B, minlength=4) / full_B.size, probs_V, atol=0.03)
  assert set(np.asarray(sample(logits_BxV, key, 0.0, 1.0)).tolist()) == {0}


# ---------------------------------------------------------------------------------------------
# Input validation.


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, VOCAB]]), f"prompt 0 has token id {VOCAB} outside the vocabulary"),
    (dict(prompts=[[3], [-1, 2]]), "prompt 1 has token id -1 outside the vocabulary"),
    (dict(max_new_tokens=8, max_len=9), r"prompt length 2 \+ max_new_tokens 8 exceeds max_len=9"),
    (dict(max_new_tokens=0), "max_new_tokens=0 must be at least 1"),
    (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(stop_tokens=(VOCAB + 1,)), f"stop token {VOCAB + 1} is outside the vocabulary"),
    (dict(prompts=np.ones((2, 3), np.int32), lengths=[3]), "lengths has 1 entries for 2 prompts"),
    (dict(prompts=np.ones((2, 3), np.int32), lengths=[3, 4]), r"lengths\[1\]=4 must be in"),
    (dict(prompts=np.ones((2, 3), np.int32), lengths=[0, 3]), "prompt 0 is empty"),
    (dict(prompts=np.ones(3, np.int32)), r"must be \[B, P\]"),
])
def test_bad_inputs_raise(llama: transformer.Transformer, kwargs: dict, match: str) -> None:
  args = dict(prompts=[[1, 2], [3]], max_new_tokens=2, rng=jax.random.key(0)) | kwargs
  with pytest.raises(ValueError, match=match):
    decode.generate(llama, **args)


def test_prefill_rejects_prompt_longer_than_cache(llama: transformer.Transformer) -> None:
  with pytest.raises(ValueError, match="prompt length 4 exceeds max_len=3"):
    decode.prefill(llama, [[1, 2, 3, 4]], max_len=3)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_continuous_batching_gives_each_prompt_its_static_tokens(model, temperature):
  """Fewer slots than prompts, mixed lengths and limits: every prompt's tokens are those that
  `generate` gives it alone (same stream), whichever slot it took and whoever sat beside it."""
  from sptlm.model import continuous
  prompts = _rows([3, 9, 1, 17, 5, 12, 2, 7, 4], seed=11)
  limits = [6, 2, 9, 4, 11, 1, 8, 3, 5]
  seeds = [7 * i + 1 for i in range(len(prompts))]
  rng = jax.random.PRNGKey(4)
  stop = [5]
  got = continuous.generate(model, prompts, slots=3, max_new_tokens=limits, rng=rng,
                            temperature=temperature, top_p=0.95, stop_tokens=stop, pad_id=0,
                            row_seeds=seeds, prompt_bucket=32, chunk_steps=4)
  for p, limit, seed, tokens in zip(prompts, limits, seeds, got):
    padded_1xP = np.zeros((1, 32), np.int32)  # one width for every reference: one compile
    padded_1xP[0, :len(p)] = p
    ref = decode.generate(model, padded_1xP, lengths=[len(p)], max_new_tokens=max(limits),
                          rng=rng,
                          temperature=temperature, top_p=0.95, stop_tokens=stop, pad_id=0,
                          row_seeds=[seed], row_max_new_tokens=[limit])
    want = np.asarray(ref.tokens)[0, :int(ref.lengths[0])]
    np.testing.assert_array_equal(tokens, want)
  assert got[5].shape == (1,)  # a limit of one token


def test_continuous_batching_compiles_once_per_shape_bucket(llama):
  from sptlm.model import continuous
  before = continuous._steps._cache_size()
  for n, lengths in ((5, [2, 3]), (9, [4, 1, 6])):
    prompts = _rows([lengths[i % len(lengths)] for i in range(n)], seed=n)
    continuous.generate(llama, prompts, slots=4, max_new_tokens=[3 + i % 5 for i in range(n)],
                        rng=jax.random.PRNGKey(0), row_seeds=list(range(n)), prompt_bucket=32)
  assert continuous._steps._cache_size() - before == 1
