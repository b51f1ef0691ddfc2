"""Attention backends behind one switch (`model.attention`).

Every backend takes q [B, L, H, Dh], k and v [B, L, K, Dh] (K kv heads, H = K * G) and
segment ids [B, L] (0 = padding) and returns [B, L, H, Dh]: causal attention that never crosses
a segment boundary. The reference is pure JAX; the fused Pallas kernel registers as "pallas".
"""

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels import flash_attention as flash
from sptlm import sharding
from sptlm.config import ConfigError, ModelConfig

Backend = Callable[..., jax.Array]
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so a fully masked row stays finite


def masked_attention(q_BxLxHxDh: jax.Array, k: jax.Array, v: jax.Array, mask_BxLxS: jax.Array,
                     *, heads_first: bool = False) -> jax.Array:
  """Softmax attention with an explicit boolean mask; GQA without repeating K/V.

  k and v are [B, S, K, Dh], or [B, K, S, Dh] with heads_first (the KV cache's layout, which
  the dots then read without a transpose)."""
  b, l, h, dh = q_BxLxHxDh.shape
  kv = "bksd" if heads_first else "bskd"
  k_heads = k.shape[1 if heads_first else 2]
  q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, l, k_heads, h // k_heads, dh)
  logits_BxKxGxLxS = jnp.einsum(f"blkgd,{kv}->bkgls", q_BxLxKxGxDh, k,
                                preferred_element_type=jnp.float32) * dh ** -0.5
  logits_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxKxGxLxS, _NEG)
  probs = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(v.dtype)
  out_BxLxKxGxDh = jnp.einsum(f"bkgls,{kv}->blkgd", probs, v)
  return out_BxLxKxGxDh.reshape(b, l, h, dh)


def segment_mask(q_seg_BxL: jax.Array, kv_seg_BxS: jax.Array, q_idx_BxL: jax.Array,
                 kv_idx_BxS: jax.Array) -> jax.Array:
  """Causal (by slot index) and within one segment."""
  same = q_seg_BxL[:, :, None] == kv_seg_BxS[:, None, :]
  causal = q_idx_BxL[:, :, None] >= kv_idx_BxS[:, None, :]
  return same & causal


def reference_attention(q_BxLxHxDh: jax.Array, k_BxLxKxDh: jax.Array, v_BxLxKxDh: jax.Array,
                        segment_ids_BxL: jax.Array, *, chunk: int = 0) -> jax.Array:
  """Pure-JAX causal segment attention.

  With `chunk` > 0 the queries go in blocks of that size under `jax.checkpoint`, so neither the
  forward nor the backward ever holds more than one [B, H, chunk, L] block of logits.
  """
  b, l = segment_ids_BxL.shape
  idx_BxL = jnp.broadcast_to(jnp.arange(l), (b, l))
  if not chunk or chunk >= l:
    mask = segment_mask(segment_ids_BxL, segment_ids_BxL, idx_BxL, idx_BxL)
    return masked_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask)
  if l % chunk:
    raise ValueError(f"sequence length {l} is not a multiple of attention_chunk {chunk}")
  n = l // chunk

  @jax.checkpoint
  def block(q_BxCxHxDh: jax.Array, seg_BxC: jax.Array, idx_BxC: jax.Array) -> jax.Array:
    mask = segment_mask(seg_BxC, segment_ids_BxL, idx_BxC, idx_BxL)
    return masked_attention(q_BxCxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask)

  def split(x: jax.Array) -> jax.Array:  # [B, L, ...] -> [n, B, C, ...]
    return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  out_NxBxCxHxDh = jax.lax.map(lambda a: block(*a),
                               (split(q_BxLxHxDh), split(segment_ids_BxL), split(idx_BxL)))
  return jnp.moveaxis(out_NxBxCxHxDh, 0, 1).reshape(q_BxLxHxDh.shape)


def _mesh_axes(name: str, rules: sharding.Rules, mesh: Mesh, size: int) -> tuple[str, ...]:
  """The mesh axes the rule for `name` gives, as many (in order) as divide `size` evenly."""
  entry = sharding.spec((name,), rules)[0]
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  kept: list[str] = []
  for axis in axes:
    if size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
      break
    kept.append(axis)
  return tuple(kept)


def _spec_entry(axes: tuple[str, ...]) -> Any:
  return None if not axes else axes[0] if len(axes) == 1 else axes


def pallas_attention(q_BxLxHxDh: jax.Array, k_BxLxKxDh: jax.Array, v_BxLxKxDh: jax.Array,
                     segment_ids_BxL: jax.Array, *, block_q: int = 512,
                     block_kv: int = 512) -> jax.Array:
  """The fused flash kernel; under a current mesh, one call per (batch, heads) shard.

  Batch and query heads split as the "batch" and "heads" rules say (axes that do not divide
  the size are left out); kv heads follow the heads' split when the "kv_heads" rule names
  the same axes and K divides, otherwise each shard keeps all kv heads and slices its own.
  The sequence is never split: the kernel needs whole rows.
  """
  kernel = functools.partial(flash.flash_attention, block_q=block_q, block_kv=block_kv)
  ctx = sharding.current()
  if ctx is None:
    return kernel(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL)
  mesh, rules = ctx
  b, _, h, _ = q_BxLxHxDh.shape
  kv_heads = k_BxLxKxDh.shape[2]
  group = h // kv_heads
  batch_axes = _mesh_axes("batch", rules, mesh, b)
  head_axes = tuple(a for a in _mesh_axes("heads", rules, mesh, h) if a not in batch_axes)
  shards = math.prod(mesh.shape[a] for a in head_axes)
  local_heads = h // shards
  kv_split = (shards > 1 and kv_heads % shards == 0
              and _mesh_axes("kv_heads", rules, mesh, kv_heads) == head_axes)
  if shards > 1 and not kv_split and local_heads % group and group % local_heads:
    raise ConfigError(f"pallas attention: {h} query heads over {shards} shards ({local_heads} "
                     f"each) do not align with kv groups of {group}; change the 'heads' rule "
                     "or the mesh")
  local_kv = kv_heads // shards if kv_split else max(local_heads // group, 1)
  q_spec = P(_spec_entry(batch_axes), None, _spec_entry(head_axes), None)
  kv_spec = q_spec if kv_split else P(_spec_entry(batch_axes), None, None, None)

  def shard(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array) -> jax.Array:
    if shards > 1 and not kv_split:  # keep only the kv heads this shard's query heads read
      first = jax.lax.axis_index(head_axes) * local_heads // group
      k, v = (jax.lax.dynamic_slice_in_dim(x, first, local_kv, axis=2) for x in (k, v))
    return kernel(q, k, v, seg)

  return jax.shard_map(shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec,
                                                    P(_spec_entry(batch_axes), None)),
                       out_specs=q_spec, check_vma=False)(
      q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL)


BACKENDS: dict[str, Backend] = {"reference": reference_attention, "pallas": pallas_attention}


def get_backend(name: str) -> Backend:
  if name not in BACKENDS:
    raise ValueError(f"model.attention={name!r} is not available; known: {', '.join(BACKENDS)}")
  return BACKENDS[name]


def backend_kwargs(cfg: ModelConfig) -> dict[str, Any]:
  """The options of the configured backend, from the model config."""
  if cfg.attention == "reference":
    return {"chunk": cfg.attention_chunk}
  if cfg.attention == "pallas":
    return {"block_q": cfg.attention_block_q, "block_kv": cfg.attention_block_kv}
  return {}
