"""The Pallas flash attention kernel (pallas_kernels/flash_attention.py) and its backend.

On CPU the kernels run in Pallas interpret mode, block by block exactly as on TPU (grid,
index maps, skipped blocks, VMEM scratch), and are checked against the pure-JAX reference:
outputs and dq/dk/dv over random shapes and segment layouts (hypothesis), inside the model,
and sharded over an 8-device CPU mesh. The TPU proof compiles the whole train step with the
kernel ahead of time for a v5p topology (Mosaic lowering and compilation run on this host).

Shapes come from a short list so each compiles once; hypothesis varies the segment layouts.
"""

import ast
import dataclasses
import functools
import importlib.util
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from pallas_kernels.flash_attention import flash_attention
from sptlm import config, sharding
from sptlm.config import ModelConfig
from sptlm.model import attention, nnx_compat, transformer

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu: pip install 'sptlm[tpu-aot]'")

# (batch, length, heads, kv heads, head dim, block_q, block_kv)
SHAPES = [
    (2, 200, 4, 2, 32, 128, 128),  # length not a multiple of the block; [B, H, L, Dh] layout
    (1, 256, 4, 1, 128, 128, 256),  # one kv head (MQA); [B, L, H*Dh] layout; unequal blocks
    (2, 130, 2, 2, 64, 256, 128),  # plain multi-head; q block longer than the sequence
]
F32_TOL = 2e-5  # float32 throughout: only summation order differs from the reference


# ---------------------------------------------------------------------------------------------
# Helpers


def random_qkv(shape: tuple[int, ...], dtype: Any, seed: int) -> tuple[jax.Array, ...]:
  """q, k, v and an output cotangent dO, standard normal."""
  b, l, h, kv, dh = shape[:5]
  rng = np.random.default_rng(seed)
  make = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dtype)  # noqa: E731
  return make(b, l, h, dh), make(b, l, kv, dh), make(b, l, kv, dh), make(b, l, h, dh)


@functools.partial(jax.jit, static_argnames=("backend", "block_q", "block_kv"))
def out_and_grads(q: jax.Array, k: jax.Array, v: jax.Array, seg_BxL: jax.Array,
                  do: jax.Array, backend: str, block_q: int = 128,
                  block_kv: int = 128) -> tuple[jax.Array, ...]:
  """(out, dq, dk, dv) of `backend` for the cotangent `do`."""
  if backend == "pallas":
    fn = functools.partial(flash_attention, block_q=block_q, block_kv=block_kv)
  else:
    fn = attention.reference_attention
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg_BxL), q, k, v)
  return (out, *vjp(do))


def assert_close(actual: jax.Array, expected: jax.Array, tol: float, name: str) -> None:
  """|actual - expected| <= tol * (|expected| + max|expected|), in float32."""
  actual, expected = (np.asarray(x, np.float32) for x in (actual, expected))
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max(),
                             err_msg=name)


def packed_row(lengths: list[int], length: int) -> list[int]:
  """Segments 1, 2, ... of these lengths, cut at `length`, then padding (0)."""
  row: list[int] = []
  for i, n in enumerate(lengths):
    row += [i + 1] * n
  return (row + [0] * length)[:length]


@st.composite
def segment_ids(draw: st.DrawFn, batch: int, length: int) -> np.ndarray:
  """Rows of one of five kinds: packed documents then padding, runs of one-token segments,
  a fully padded row, one segment, or ids scattered at random (padding in the middle too)."""
  rows = []
  for _ in range(batch):
    kind = draw(st.sampled_from(["packed", "one_token", "padded", "whole", "scattered"]))
    if kind == "packed":
      lengths = draw(st.lists(st.integers(1, length), min_size=1, max_size=6))
      rows.append(packed_row(lengths, length))
    elif kind == "one_token":
      lengths = draw(st.lists(st.sampled_from([1, 1, 1, 2, 3, 40]), min_size=1, max_size=80))
      rows.append(packed_row(lengths, length))
    elif kind == "padded":
      rows.append([0] * length)
    elif kind == "whole":
      rows.append([1] * length)
    else:
      seed = draw(st.integers(0, 2**16))
      rows.append(list(np.random.default_rng(seed).integers(0, 3, length)))
  return np.asarray(rows, np.int32)


@st.composite
def cases(draw: st.DrawFn) -> tuple[tuple[int, ...], np.ndarray, int]:
  shape = draw(st.sampled_from(SHAPES))
  return shape, draw(segment_ids(shape[0], shape[1])), draw(st.integers(0, 1000))


# ---------------------------------------------------------------------------------------------
# The kernel against the reference


@settings(max_examples=25, deadline=None)
@given(cases())
def test_matches_reference_float32(case: tuple[tuple[int, ...], np.ndarray, int]) -> None:
  shape, seg, seed = case
  q, k, v, do = random_qkv(shape, jnp.float32, seed)
  block_q, block_kv = shape[5:]
  got = out_and_grads(q, k, v, jnp.asarray(seg), do, "pallas", block_q, block_kv)
  want = out_and_grads(q, k, v, jnp.asarray(seg), do, "reference")
  for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
    assert a.shape == e.shape and a.dtype == e.dtype, name
    assert bool(jnp.all(jnp.isfinite(a))), name
    assert_close(a, e, F32_TOL, f"{name} for segments\n{seg}")


def test_bfloat16_is_as_accurate_as_the_reference() -> None:
  """bf16 inputs, float32 accumulation: error against the float32 computation of the same
  bf16 inputs. bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%), and every
  result is rounded to bf16 once more; the reference in bf16 carries the same rounding plus
  bf16 probabilities. So the kernel may be no worse than the reference backend, and both stay
  within 1% of the largest magnitude."""
  shape = SHAPES[1]
  seg = jnp.asarray(np.asarray([packed_row([1, 60, 1, 1, 100], shape[1])], np.int32))
  q, k, v, do = random_qkv(shape, jnp.bfloat16, seed=3)
  truth = out_and_grads(*(x.astype(jnp.float32) for x in (q, k, v)), seg,
                        do.astype(jnp.float32), "reference")
  ours = out_and_grads(q, k, v, seg, do, "pallas", *shape[5:])
  ref = out_and_grads(q, k, v, seg, do, "reference")
  for name, a, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, truth):
    assert a.dtype == jnp.bfloat16, name
    t = np.asarray(t)
    err_ours = np.abs(np.asarray(a, np.float32) - t).max() / np.abs(t).max()
    err_ref = np.abs(np.asarray(r, np.float32) - t).max() / np.abs(t).max()
    assert err_ours <= max(1.5 * err_ref, 2**-8), (name, err_ours, err_ref)
    assert err_ours < 1e-2, (name, err_ours)


def test_fully_padded_rows_are_finite_and_match() -> None:
  """Rows of padding only (segment 0 everywhere) attend causally among themselves, like the
  reference; a padded row's outputs and gradients stay finite."""
  shape = SHAPES[0]
  seg = jnp.zeros(shape[:2], jnp.int32).at[1, :57].set(1)
  q, k, v, do = random_qkv(shape, jnp.float32, seed=5)
  got = out_and_grads(q, k, v, seg, do, "pallas", *shape[5:])
  want = out_and_grads(q, k, v, seg, do, "reference")
  for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
    assert bool(jnp.all(jnp.isfinite(a))), name
    assert_close(a, e, F32_TOL, name)


def test_gradients_stay_inside_segments() -> None:
  """dk/dv of a segment's keys come only from that segment's queries: zero cotangent on the
  other segments leaves them exactly zero."""
  shape = SHAPES[0]
  seg = jnp.asarray(np.tile(packed_row([70, 1, 90], shape[1]), (shape[0], 1)))
  q, k, v, do = random_qkv(shape, jnp.float32, seed=6)
  do = do * (seg == 2)[..., None, None]  # only the one-token segment at index 70
  _, dq, dk, dv = out_and_grads(q, k, v, seg, do, "pallas", *shape[5:])
  outside = np.asarray(seg != 2)
  for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
    assert np.all(np.asarray(g)[outside] == 0.0), name
  assert np.all(np.asarray(dv)[:, 70] != 0.0)  # its own value gets the whole cotangent


def test_non_causal_matches_segment_only_mask() -> None:
  shape = SHAPES[0]
  seg = jnp.asarray(np.asarray([packed_row([70, 1, 90], shape[1]), [0] * shape[1]], np.int32))
  q, k, v, do = random_qkv(shape, jnp.float32, seed=8)

  def grads(fn: Any) -> tuple[jax.Array, ...]:
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))

  got = jax.jit(lambda: grads(lambda q, k, v: flash_attention(
      q, k, v, seg, block_q=128, block_kv=128, causal=False)))()
  mask_BxLxL = seg[:, :, None] == seg[:, None, :]
  want = grads(lambda q, k, v: attention.masked_attention(q, k, v, mask_BxLxL))
  for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
    assert_close(a, e, F32_TOL, name)


def test_kernels_import_nothing_from_sptlm() -> None:
  for path in (CONFIG_DIR.parent / "pallas_kernels").glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        assert not any((n or "").split(".")[0] == "sptlm" for n in names), path


@pytest.mark.parametrize("bad, match", [
    (dict(block_q=100), "block_q=100 must be a positive multiple of 128"),
    (dict(block_kv=0), "block_kv=0"),
    (dict(kv_heads=3), "not a multiple of 3 kv heads"),
])
def test_bad_arguments_say_what_is_wrong(bad: dict[str, int], match: str) -> None:
  kv_heads = bad.pop("kv_heads", 2)
  q = jnp.zeros((1, 128, 4, 32))
  k = jnp.zeros((1, 128, kv_heads, 32))
  with pytest.raises(ValueError, match=match):
    flash_attention(q, k, k, jnp.ones((1, 128), jnp.int32), **bad)


# ---------------------------------------------------------------------------------------------
# The backend in the model, single device and sharded


def tiny_model(tiny_config: config.Config, **changes: Any) -> ModelConfig:
  """The tiny config at 2 layers in float32."""
  return dataclasses.replace(tiny_config.model, num_layers=2, dtype="float32", **changes)


def model_batch(rows: int, length: int) -> dict[str, jax.Array]:
  """Packed rows (a one-token segment among them) then padding; `length` not a multiple of 128."""
  ids = [packed_row([37, 1, 22], length), packed_row([1, 1, 90], length),
         packed_row([length], length), [0] * length]
  seg_BxL = jnp.asarray(np.asarray((ids * rows)[:rows], np.int32))
  starts = np.concatenate([np.zeros((rows, 1), bool), np.diff(seg_BxL, axis=1) != 0], axis=1)
  pos = np.zeros((rows, length), np.int32)
  for r in range(rows):
    for t in range(1, length):
      pos[r, t] = 0 if starts[r, t] else pos[r, t - 1] + 1
  tokens = jax.random.randint(jax.random.key(0), (rows, length), 0, 256)
  return {"tokens": tokens, "positions": jnp.asarray(pos), "segment_ids": seg_BxL}


def loss_and_grads(cfg: ModelConfig, params: nnx.State, batch: dict[str, jax.Array],
                   mesh_rules: tuple[Any, Any] | None = None) -> tuple[jax.Array, Any]:
  """Next-token cross-entropy (padding carries none) and its parameter gradients."""
  graphdef = nnx.split(nnx.eval_shape(lambda: transformer.build(cfg, 256, 0)), nnx.Param)[0]

  def loss(p: nnx.State, b: dict[str, jax.Array]) -> jax.Array:
    logits = nnx.merge(graphdef, p)(b["tokens"], b["positions"], b["segment_ids"])[:, :-1]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, b["tokens"][:, 1:])
    w = (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]) & (b["segment_ids"][:, 1:] != 0)
    return jnp.sum(xent * w) / jnp.sum(w)

  step = jax.jit(jax.value_and_grad(loss))  # a fresh jit per call: traces see the rules
  if mesh_rules is None:
    return step(params, batch)
  with sharding.logical_rules(*mesh_rules):
    return step(params, batch)


@pytest.fixture(scope="module")
def tiny_params(tiny_config: config.Config) -> nnx.State:
  return nnx.split(transformer.build(tiny_model(tiny_config), 256, 0), nnx.Param)[1]


@pytest.fixture(scope="module")
def reference_loss_and_grads(tiny_config: config.Config, tiny_params: nnx.State) -> tuple:
  return loss_and_grads(tiny_model(tiny_config), tiny_params, model_batch(4, 100))


def assert_trees_close(actual: Any, expected: Any, tol: float) -> None:
  for (path, a), (_, e) in zip(jax.tree_util.tree_leaves_with_path(actual),
                               jax.tree_util.tree_leaves_with_path(expected), strict=True):
    assert_close(a, e, tol, jax.tree_util.keystr(path))


def test_model_pallas_equals_reference(tiny_config: config.Config, tiny_params: nnx.State,
                                       reference_loss_and_grads: tuple) -> None:
  cfg = tiny_model(tiny_config, attention="pallas")
  loss, grads = loss_and_grads(cfg, tiny_params, model_batch(4, 100))
  loss_ref, grads_ref = reference_loss_and_grads
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  assert_trees_close(grads, grads_ref, 1e-5)


def test_model_pallas_sharded_equals_reference(tiny_config: config.Config,
                                               tiny_params: nnx.State,
                                               reference_loss_and_grads: tuple) -> None:
  """data=2 x fsdp=2 x tensor=2 on 8 CPU devices: one kernel per (batch, heads) shard."""
  cfg = tiny_model(tiny_config, attention="pallas")
  rules = tiny_config.mesh.rules
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = jax.tree.map(lambda names: sharding.named(mesh, rules, names),
                           nnx_compat.logical_names(tiny_params),
                           is_leaf=lambda x: isinstance(x, tuple))
  params = jax.device_put(tiny_params, shardings)
  batch = jax.device_put(model_batch(4, 100), sharding.named(mesh, rules, ("batch", "length")))
  loss, grads = loss_and_grads(cfg, params, batch, (mesh, rules))
  loss_ref, grads_ref = reference_loss_and_grads
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  assert_trees_close(grads, grads_ref, 1e-5)


@pytest.mark.parametrize("heads, kv_heads", [(8, 1), (8, 4)],
                         ids=["group_spans_shards", "shard_holds_groups"])
def test_backend_with_replicated_kv_heads(heads: int, kv_heads: int) -> None:
  """kv heads left whole on every tensor shard (glm4_9b's rule): each shard slices the kv
  heads its query heads read, and their gradients add up across shards."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = (("batch", ("data", "fsdp")), ("heads", ("tensor",)), ("kv_heads", ()))
  shape = (4, 200, heads, kv_heads, 32)
  q, k, v, do = random_qkv(shape, jnp.float32, seed=7)
  seg = jnp.asarray(np.asarray([packed_row([50, 1, 120], 200), packed_row([200], 200),
                                [0] * 200, packed_row([1] * 30, 200)], np.int32))

  def run(fn: Any) -> tuple[jax.Array, ...]:
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
    return (out, *vjp(do))

  want = jax.jit(lambda *a: run(attention.reference_attention))(q, k, v)
  with sharding.logical_rules(mesh, rules):
    got = jax.jit(lambda *a: run(functools.partial(attention.pallas_attention, block_q=128,
                                                   block_kv=128)))(q, k, v)
  for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
    assert_close(a, e, F32_TOL, name)


def test_backend_kwargs_follow_the_config(tiny_config: config.Config) -> None:
  cfg = tiny_model(tiny_config, attention="pallas", attention_block_q=256)
  assert attention.get_backend("pallas") is attention.pallas_attention
  assert attention.backend_kwargs(cfg) == {"block_q": 256, "block_kv": 512}
  assert attention.backend_kwargs(tiny_config.model) == {"chunk": 0}


# ---------------------------------------------------------------------------------------------
# Proof for TPU: the train step with the kernel, compiled ahead of time for a v5p slice


def compile_train_step(path: pathlib.Path, topology: str, overrides: list[str],
                       per_device_batch: int = 1,
                       rules: dict[str, tuple[str, ...]] | None = None) -> tuple[dict, str]:
  """Memory per device and the compiled program's text, for the train step of `path`."""
  from sptlm import aot
  from sptlm.train import program as program_lib

  cfg = config.load(path, overrides)
  devices = aot.topology_devices(aot.parse_topology(topology))
  mesh_cfg = dataclasses.replace(cfg.mesh, rules=tuple(dict(cfg.mesh.rules, **(rules or {}))
                                                       .items()))
  cfg = dataclasses.replace(cfg, mesh=mesh_cfg, data=dataclasses.replace(
      cfg.data, global_batch_size=per_device_batch * len(devices)))
  mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                             "tensor": cfg.mesh.tensor}, devices)
  program = program_lib.build(cfg, mesh)
  compiled = program.step.lower(program.abstract_state, program.abstract_batch()).compile()
  mem = compiled.memory_analysis()
  return {"temp": mem.temp_size_in_bytes, "args": mem.argument_size_in_bytes,
          "kind": devices[0].device_kind}, compiled.as_text()


def assert_mosaic_kernels(hlo: str) -> None:
  """The three kernels are Mosaic custom calls, not the interpreter's loops."""
  assert "tpu_custom_call" in hlo
  for name in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"):
    assert name in hlo, name


@needs_libtpu
def test_train_step_compiles_for_v5p() -> None:
  """The tiny model at head dim 128 (the [B, L, H*Dh] layout of the real configs), batch over
  fsdp and heads over tensor, kv heads split with them."""
  report, hlo = compile_train_step(
      CONFIG_DIR / "tiny.py", "v5p-8",
      ["--config.model.attention=pallas", "--config.model.head_dim=128",
       "--config.model.dtype=bfloat16", "--config.mesh.data=1", "--config.mesh.fsdp=2",
       "--config.mesh.tensor=2"], per_device_batch=2)
  assert report["kind"].startswith("TPU v5")
  assert_mosaic_kernels(hlo)
  assert 0 < report["temp"] < 0.2e9


@needs_libtpu
@pytest.mark.slow
def test_train_step_compiles_for_v5p_small_heads_replicated_kv() -> None:
  """Head dim 32 ([B, H, L, Dh] layout) with kv heads replicated over tensor (9B's rule)."""
  report, hlo = compile_train_step(
      CONFIG_DIR / "tiny.py", "v5p-8",
      ["--config.model.attention=pallas", "--config.mesh.data=1", "--config.mesh.fsdp=2",
       "--config.mesh.tensor=2"], per_device_batch=2, rules={"kv_heads": ()})
  assert_mosaic_kernels(hlo)
  assert 0 < report["temp"] < 0.2e9


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("name, limit", [("lm_1b", 95e9), ("glm4_9b", 11.0e9)])
def test_big_configs_fit_v5p_128_with_pallas(name: str, limit: float) -> None:
  """Sequence 8,192, one row per device on a v5p-128; the 9B under MaxText's 11.0 GB."""
  from sptlm import aot

  cfg = config.load(CONFIG_DIR / f"{name}.py", ["--config.model.attention=pallas"])
  report = aot.compile_for_topology(cfg, "v5p-128", per_device_batch=1)
  assert report["num_devices"] == 64
  assert 0 < report["total_bytes"] < limit, report["total_bytes"]
