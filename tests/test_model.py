"""Fast CPU tests of the transformer: shapes, causality, packing, and that scan, remat, chunked
attention and sharding change nothing but speed and memory; plus an abstract build of every
config file. All numerics are float32 so the tolerances can stay tight.
"""

import dataclasses
import functools
import math
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from data_pipelines.vocabulary import Vocabulary
from sptlm import config, sharding
from sptlm.config import ModelConfig
from sptlm.model import attention, nnx_compat, transformer
from sptlm.model.rotary import apply_rotary

VOCAB = 256  # a multiple of tensor=2, so the mesh test can shard it
# GLM-4's options (biases, half-width interleaved rotary) and a chunked attention backend.
GLM_OPTIONS: dict[str, Any] = dict(qkv_bias=True, rope_fraction=0.5, rope_style="interleaved",
                                   attention_chunk=4)


class Batch(NamedTuple):
  tokens_BxL: jax.Array
  positions_BxL: jax.Array
  segment_ids_BxL: jax.Array


# ---------------------------------------------------------------------------------------------
# Helpers


def small(base: ModelConfig, **changes: Any) -> ModelConfig:
  """The tiny config's widths at 2 layers, float32, scanned, no remat; `changes` on top."""
  fields: dict[str, Any] = dict(num_layers=2, dtype="float32", param_dtype="float32",
                                remat="none", scan_layers=True, attention_chunk=0)
  fields.update(changes)
  return dataclasses.replace(base, **fields)


@functools.cache
def graphdef_for(cfg: ModelConfig) -> nnx.GraphDef:
  """The structure of a `cfg` model, to run another model's parameters with `cfg`'s options."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: transformer.build(cfg, VOCAB, 0)), nnx.Param)
  return graphdef


@functools.cache
def init(cfg: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
  """Random parameters, built once per config; tests must not mutate them."""
  return nnx.split(transformer.build(cfg, VOCAB, seed), nnx.Param)


def forward(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch) -> jax.Array:
  return nnx.merge(graphdef, params)(*batch)


def loss_fn(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch) -> jax.Array:
  """Mean next-token cross-entropy within segments; padding (segment 0) carries no loss."""
  logits_BxLxV = forward(graphdef, params, batch)[:, :-1]
  targets_BxL = batch.tokens_BxL[:, 1:]
  seg_BxL = batch.segment_ids_BxL
  weights_BxL = ((seg_BxL[:, 1:] == seg_BxL[:, :-1]) & (seg_BxL[:, 1:] != 0)).astype(jnp.float32)
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  nll_BxL = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return jnp.sum(nll_BxL * weights_BxL) / jnp.sum(weights_BxL)


def loss_and_grad(graphdef: nnx.GraphDef, params: nnx.State,
                  batch: Batch) -> tuple[jax.Array, nnx.State]:
  # A fresh closure per call: jit must never reuse a trace made under other sharding rules.
  return jax.jit(jax.value_and_grad(lambda p, b: loss_fn(graphdef, p, b)))(params, batch)


def packed_batch(seed: int, rows: int, segment_lengths: Sequence[int], length: int) -> Batch:
  """Random tokens; each row packs segments of these lengths, then padding (segment 0)."""
  positions: list[int] = []
  segments: list[int] = []
  for i, n in enumerate(segment_lengths):
    positions += range(n)
    segments += [i + 1] * n
  if len(positions) > length:
    raise ValueError(f"segments {segment_lengths} do not fit in length {length}")
  pad = length - len(positions)
  positions += [0] * pad
  segments += [0] * pad
  tokens_BxL = jax.random.randint(jax.random.key(seed), (rows, length), 0, VOCAB)
  return Batch(tokens_BxL, jnp.tile(jnp.asarray(positions, jnp.int32), (rows, 1)),
               jnp.tile(jnp.asarray(segments, jnp.int32), (rows, 1)))


@functools.cache
def shared_batch() -> Batch:
  """4 rows (one per data x fsdp shard) of 32 tokens (4 attention chunks of 8): two segments
  and padding."""
  return packed_batch(4, rows=4, segment_lengths=(13, 11), length=32)


@functools.cache
def base_loss_and_grad(base: ModelConfig, cfg: ModelConfig) -> tuple[jax.Array, nnx.State]:
  """Loss and grads on `shared_batch()` of `base`'s parameters run with `cfg`'s options.

  Cached, because several tests compare against the same baseline.
  """
  _, params = init(base)
  return loss_and_grad(graphdef_for(cfg), params, shared_batch())


def assert_trees_close(actual: Any, expected: Any, rtol: float) -> None:
  """Leafwise: |actual - expected| <= rtol * (|expected| + max|expected leaf|)."""
  got = jax.tree_util.tree_leaves_with_path(actual)
  want = jax.tree_util.tree_leaves_with_path(expected)
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, a), (_, e) in zip(got, want):
    e = np.asarray(e)
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=rtol * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def model_cfg(tiny_config: config.Config) -> ModelConfig:
  return small(tiny_config.model)


# ---------------------------------------------------------------------------------------------
# Forward pass


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_logits_shape_and_finite(tiny_config: config.Config, dtype: str, tie: bool) -> None:
  cfg = small(tiny_config.model, dtype=dtype, tie_embeddings=tie)
  graphdef, params = init(cfg)
  assert ("lm_head" in params) == (not tie)
  batch = packed_batch(0, rows=3, segment_lengths=(10, 6), length=20)
  logits_BxLxV = jax.jit(lambda p, b: forward(graphdef, p, b))(params, batch)
  assert logits_BxLxV.shape == (3, 20, VOCAB)
  assert logits_BxLxV.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits_BxLxV)))


@pytest.mark.parametrize("options", [{}, GLM_OPTIONS], ids=["llama", "glm"])
def test_causal(tiny_config: config.Config, options: dict[str, Any]) -> None:
  """Output t has exactly zero gradient w.r.t. the embeddings at positions after t."""
  cfg = small(tiny_config.model, tie_embeddings=False, **options)  # untied: embed is input only
  graphdef, params = init(cfg)
  length = 16
  # Distinct ids, so row `tokens[s]` of the embedding gradient belongs to position s alone.
  tokens_L = jax.random.permutation(jax.random.key(1), VOCAB)[:length]
  batch = Batch(tokens_L[None], jnp.arange(length)[None], jnp.ones((1, length), jnp.int32))
  w_LxV = jax.random.normal(jax.random.key(2), (length, VOCAB))

  def per_position(embed_VxD: jax.Array) -> jax.Array:
    p = nnx.State(dict(params))
    p["embed"] = params["embed"].replace(value=embed_VxD)
    return jnp.sum(forward(graphdef, p, batch)[0] * w_LxV, axis=-1)

  jac_LxVxD = jax.jit(jax.jacrev(per_position))(params["embed"].get_value())
  size_LxL = np.abs(np.asarray(jac_LxVxD[:, tokens_L])).max(axis=-1)  # [out t, input s]
  later_LxL = np.triu(np.ones((length, length), bool), k=1)
  assert np.all(size_LxL[later_LxL] == 0.0), np.argwhere(size_LxL * later_LxL)
  assert np.all(size_LxL[~later_LxL] > 0.0)  # the test can see a dependence when there is one


def test_packed_segments_are_independent(model_cfg: ModelConfig) -> None:
  """Each segment of a packed row gives the logits it gives alone, positions from 0."""
  graphdef, params = init(model_cfg)
  lengths = (11, 13)
  packed = packed_batch(3, rows=1, segment_lengths=lengths, length=32)
  fwd = jax.jit(lambda p, b: forward(graphdef, p, b))
  logits_packed = np.asarray(fwd(params, packed))
  start = 0
  for n in lengths:
    alone = Batch(packed.tokens_BxL[:, start:start + n], jnp.arange(n)[None],
                  jnp.ones((1, n), jnp.int32))
    np.testing.assert_allclose(logits_packed[:, start:start + n], fwd(params, alone),
                               rtol=1e-5, atol=1e-5, err_msg=f"segment at {start}")
    start += n


# ---------------------------------------------------------------------------------------------
# Things that must change nothing: scan, remat, chunked attention


def test_scan_equals_loop(model_cfg: ModelConfig) -> None:
  _, params = init(model_cfg)
  batch = shared_batch()
  loop_cfg = dataclasses.replace(model_cfg, scan_layers=False)

  def logits(cfg: ModelConfig) -> jax.Array:
    return jax.jit(lambda p, b: forward(graphdef_for(cfg), p, b))(params, batch)

  np.testing.assert_allclose(logits(loop_cfg), logits(model_cfg), rtol=1e-6, atol=1e-6)
  loss_scan, grads_scan = base_loss_and_grad(model_cfg, model_cfg)
  loss_loop, grads_loop = base_loss_and_grad(model_cfg, loop_cfg)
  np.testing.assert_allclose(loss_loop, loss_scan, rtol=1e-6)
  assert_trees_close(grads_loop, grads_scan, rtol=1e-5)


# Every policy under scan; the unrolled loop (jax.checkpoint with prevent_cse) once.
@pytest.mark.parametrize("policy, scan", [
    *(pytest.param(p, True, id=f"{p}-scan") for p in transformer.REMAT_POLICIES if p != "none"),
    pytest.param("full", False, id="full-loop")])
def test_remat_changes_nothing(model_cfg: ModelConfig, policy: str, scan: bool) -> None:
  plain_cfg = dataclasses.replace(model_cfg, remat="none", scan_layers=scan)
  loss_none, grads_none = base_loss_and_grad(model_cfg, plain_cfg)
  loss_remat, grads_remat = base_loss_and_grad(
      model_cfg, dataclasses.replace(plain_cfg, remat=policy))
  np.testing.assert_allclose(loss_remat, loss_none, rtol=1e-6)
  assert_trees_close(grads_remat, grads_none, rtol=1e-5)


def test_chunked_attention_equals_unchunked() -> None:
  b, l, h, k, dh = 2, 32, 4, 2, 16
  keys = jax.random.split(jax.random.key(6), 4)
  q = jax.random.normal(keys[0], (b, l, h, dh))
  kv = [jax.random.normal(keys[i], (b, l, k, dh)) for i in (1, 2)]
  w_BxLxHxDh = jax.random.normal(keys[3], (b, l, h, dh))
  seg_BxL = packed_batch(0, rows=b, segment_lengths=(5, 12, 9), length=l).segment_ids_BxL

  def run(chunk: int) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    def f(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
      out = attention.reference_attention(q, k, v, seg_BxL, chunk=chunk)
      return jnp.sum(out * w_BxLxHxDh), out
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, *kv)
    return out, grads

  out_full, grads_full = run(0)
  out_chunk, grads_chunk = run(8)
  np.testing.assert_allclose(out_chunk, out_full, rtol=1e-6, atol=1e-6)
  assert_trees_close(grads_chunk, grads_full, rtol=1e-5)
  with pytest.raises(ValueError, match="multiple of attention_chunk"):
    attention.reference_attention(q, *kv, seg_BxL, chunk=12)


def test_chunked_model_equals_unchunked(model_cfg: ModelConfig) -> None:
  assert model_cfg.attention_chunk == 0 and shared_batch().tokens_BxL.shape[1] == 32
  loss_full, grads_full = base_loss_and_grad(model_cfg, model_cfg)
  loss_chunk, grads_chunk = base_loss_and_grad(
      model_cfg, dataclasses.replace(model_cfg, attention_chunk=8))
  np.testing.assert_allclose(loss_chunk, loss_full, rtol=1e-6)
  assert_trees_close(grads_chunk, grads_full, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Rotary embeddings


def numpy_rotary(x: np.ndarray, positions: np.ndarray, theta: float, fraction: float,
                 style: str) -> np.ndarray:
  """Float64 reference: rotates pairs (i, i + R/2) or (2i, 2i + 1) of the first R dims."""
  rot = int(x.shape[-1] * fraction)
  half = np.arange(rot // 2)
  first, second = (half, half + rot // 2) if style == "rotate_half" else (2 * half, 2 * half + 1)
  angle = positions[..., None, None].astype(np.float64) * theta ** (-2.0 * half / rot)
  x = x.astype(np.float64)
  out = x.copy()
  out[..., first] = x[..., first] * np.cos(angle) - x[..., second] * np.sin(angle)
  out[..., second] = x[..., second] * np.cos(angle) + x[..., first] * np.sin(angle)
  return out


def rotary_inputs(dh: int = 16) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  x_BxLxNxDh = rng.standard_normal((2, 12, 3, dh)).astype(np.float32)
  positions_BxL = rng.integers(0, 100, (2, 12)).astype(np.int32)
  positions_BxL[:, 0] = 0
  return x_BxLxNxDh, positions_BxL


@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("style", ["rotate_half", "interleaved"])
def test_rotary_matches_numpy(style: str, fraction: float) -> None:
  x, positions = rotary_inputs()
  got = apply_rotary(jnp.asarray(x), jnp.asarray(positions), theta=10_000.0, fraction=fraction,
                     style=style)
  want = numpy_rotary(x, positions, 10_000.0, fraction, style)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["rotate_half", "interleaved"])
def test_partial_rotary_leaves_the_tail(style: str) -> None:
  x, positions = rotary_inputs()
  got = np.asarray(apply_rotary(jnp.asarray(x), jnp.asarray(positions), theta=10_000.0,
                                fraction=0.5, style=style))
  np.testing.assert_array_equal(got[..., 8:], x[..., 8:])
  np.testing.assert_allclose(got[:, 0], x[:, 0], rtol=1e-6, atol=1e-6)  # position 0: identity
  moved = positions > 0
  assert np.all(np.abs(got[..., :8] - x[..., :8]).max(axis=(-2, -1))[moved] > 1e-3)


def test_interleaved_is_a_permutation_of_rotate_half() -> None:
  """Interleaved pair (2i, 2i+1) is rotate-half pair (i, i + R/2) with the dims reordered."""
  x, positions = rotary_inputs()
  rot = 8  # fraction 0.5 of 16: the permutation touches only the rotated dims
  perm = np.concatenate([np.stack([np.arange(rot // 2), np.arange(rot // 2) + rot // 2], -1)
                         .reshape(-1), np.arange(rot, x.shape[-1])])
  kw = dict(theta=10_000.0, fraction=0.5)
  half = apply_rotary(jnp.asarray(x), jnp.asarray(positions), style="rotate_half", **kw)
  inter = apply_rotary(jnp.asarray(x[..., perm]), jnp.asarray(positions), style="interleaved",
                       **kw)
  np.testing.assert_allclose(inter, np.asarray(half)[..., perm], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("style", ["rotate_half", "interleaved"])
def test_rotary_scores_depend_on_relative_position(style: str) -> None:
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32) for _ in range(2))

  def score(m: int, n: int) -> float:
    rotate = lambda x, p: apply_rotary(x, jnp.full((1, 1), p), theta=10_000.0,  # noqa: E731
                                       fraction=1.0, style=style)
    return float(jnp.sum(rotate(q, m) * rotate(k, n)))

  np.testing.assert_allclose(score(7, 3), score(24, 20), rtol=1e-5, atol=1e-5)
  assert abs(score(7, 3) - score(3, 7)) > 1e-4


# ---------------------------------------------------------------------------------------------
# Sharding


def test_sharded_equals_unsharded(tiny_config: config.Config) -> None:
  """FSDP + tensor + data parallel on 8 CPU devices gives the single-device loss and grads."""
  cfg = small(tiny_config.model)
  rules = tiny_config.mesh.rules
  graphdef, params = init(cfg)
  batch = shared_batch()  # 4 rows: one per (data, fsdp) shard
  loss_ref, grads_ref = base_loss_and_grad(cfg, cfg)  # single device, no rules

  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = jax.tree.map(lambda names: sharding.named(mesh, rules, names),
                           nnx_compat.logical_names(params),
                           is_leaf=lambda x: isinstance(x, tuple))
  params_sharded = jax.device_put(params, shardings)
  batch_sharded = jax.device_put(batch, sharding.named(mesh, rules, ("batch", "length")))
  q = params_sharded["layers"]["attn"]["q"].get_value()
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert len(q.sharding.device_set) == 8

  step = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(graphdef, p, b)))
  with sharding.logical_rules(mesh, rules):
    hlo = step.lower(params_sharded, batch_sharded).as_text()
    loss_sharded, grads_sharded = step(params_sharded, batch_sharded)
  assert "sharding_constraint" in hlo  # the activation constraints are in the program

  np.testing.assert_allclose(loss_sharded, loss_ref, rtol=1e-5)
  assert_trees_close(grads_sharded, grads_ref, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Every config, built abstractly

PARAM_RANGES: dict[str, tuple[float, float]] = {
    "glm4_9b": (9e9, 10.5e9),
    "lm_1b": (0.9e9, 1.6e9),
    "lm_150m": (1.2e8, 2.2e8),
}


def test_config_builds_abstractly(config_path: pathlib.Path) -> None:
  cfg = config.load(config_path)
  vocab_size = Vocabulary(cfg.vocab.text_size, cfg.vocab.speech_size).size
  model = nnx.eval_shape(lambda: transformer.build(cfg.model, vocab_size, 0))
  params = nnx.state(model, nnx.Param)
  count = transformer.count_params(params)
  print(f"{config_path.stem}: {count:,} parameters ({count / 1e9:.3f}B)")

  assert params["embed"].get_value().shape == (vocab_size, cfg.model.d_model)
  names = nnx_compat.flat_paths(nnx_compat.logical_names(params))
  for path, leaf in nnx_compat.flat_paths(params).items():
    leaf_names = names[path]
    assert len(leaf_names) == leaf.get_value().ndim, path
    sharding.spec(leaf_names, cfg.mesh.rules)  # every logical name has a rule
  lo, hi = PARAM_RANGES.get(config_path.stem, (0, math.inf))
  assert lo <= count <= hi, f"{config_path.stem}: {count:,} parameters, expected [{lo:g}, {hi:g}]"
