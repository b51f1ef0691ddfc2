"""Attention backends behind one switch (`model.attention`).

Every backend takes q [B, L, H, Dh], k and v [B, L, K, Dh] (K kv heads, H = K * G) and
segment ids [B, L] (0 = padding) and returns [B, L, H, Dh]: causal attention that never crosses
a segment boundary. The reference is pure JAX; the fused Pallas kernel registers as "pallas".
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

Backend = Callable[..., jax.Array]
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so a fully masked row stays finite


def masked_attention(q_BxLxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array,
                     mask_BxLxS: jax.Array) -> jax.Array:
  """Softmax attention with an explicit boolean mask; GQA without repeating K/V."""
  b, l, h, dh = q_BxLxHxDh.shape
  k_heads = k_BxSxKxDh.shape[2]
  q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, l, k_heads, h // k_heads, dh)
  logits_BxKxGxLxS = jnp.einsum("blkgd,bskd->bkgls", q_BxLxKxGxDh, k_BxSxKxDh,
                                preferred_element_type=jnp.float32) * dh ** -0.5
  logits_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxKxGxLxS, _NEG)
  probs = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(v_BxSxKxDh.dtype)
  out_BxLxKxGxDh = jnp.einsum("bkgls,bskd->blkgd", probs, v_BxSxKxDh)
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


BACKENDS: dict[str, Backend] = {"reference": reference_attention}


def get_backend(name: str) -> Backend:
  if name not in BACKENDS:
    hint = " (the fused kernel of issue #4 is not built yet)" if name == "pallas" else ""
    raise ValueError(f"model.attention={name!r} is not available{hint}; "
                     f"known: {', '.join(BACKENDS)}")
  return BACKENDS[name]
