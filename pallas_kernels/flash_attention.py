"""Flash attention for TPU (Pallas / Mosaic): causal, packed segments, grouped-query heads.

  out = flash_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL,
                        block_q=512, block_kv=512)

Semantics (those of the pure-JAX reference): query t sees key s iff s <= t (causal=True) and
both carry the same segment id; segment id 0 (padding) is an ordinary segment, so every row
sees at least its own key and every output is finite. Query head h reads kv head h // (H // K):
the block index maps pick the kv head, K/V are never repeated.

Three kernels with float32 running state in VMEM and bfloat16 (or float32) MXU operands:
  forward   grid (batch x head, query block, key block): online softmax; saves the output
            and the row logsumexp.
  dq        same grid: recomputes P = exp(S - logsumexp) per block, accumulates dQ, and
            makes di = rowsum(dO * O) on the way.
  dk/dv     grid (batch x kv head x key block, group member, query block): one kv head's dK
            and dV accumulate over its whole query group, in the transposed orientation.
A block (query block, key block) is skipped when it lies above the diagonal or when the
segment ranges of its rows and columns cannot meet (per-block min/max ids, scalar prefetch).
Above the diagonal the index maps repeat the last block fetched, so those steps move no data.
Blocks below the diagonal inside one segment skip building the mask.

Layouts: with a head dim that is a multiple of 128, q/k/v are reshaped (not transposed) to
[B, L, heads * Dh] and a block is one head's [block, Dh] column slice; otherwise they are
transposed to [B, heads, L, Dh]. Sequences are padded internally to a multiple of the blocks;
the padded slots get a segment id of their own (PAD_SEGMENT), so no real row sees them,
causal or not.

The kernels and their block specs live in flash_kernels.py; this file pads, lays out and
differentiates. `interpret=None` compiles with Mosaic when lowered for TPU (including ahead
of time from a CPU host) and runs the Pallas interpreter on any other platform.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.flash_kernels import (LANES, PAD_SEGMENT, SUBLANES, Plan, Segments,
                                          backward_dkv, backward_dq, forward)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def flash_attention(q_BxLxHxDh: jax.Array, k_BxLxKxDh: jax.Array, v_BxLxKxDh: jax.Array,
                    segment_ids_BxL: jax.Array, *, block_q: int = 512, block_kv: int = 512,
                    causal: bool = True, scale: float | None = None,
                    interpret: bool | None = None) -> jax.Array:
  """Attention of q over k/v within segments; [B, L, H, Dh] in, [B, L, H, Dh] out.

  block_q / block_kv: multiples of 128; blocks longer than the (128-rounded) sequence shrink
  to it. scale defaults to Dh ** -0.5. interpret: None picks Mosaic on TPU, the interpreter
  elsewhere; True or False forces one.
  """
  b, l, h, dh = q_BxLxHxDh.shape
  kv_heads = k_BxLxKxDh.shape[2]
  if k_BxLxKxDh.shape != (b, l, kv_heads, dh) or v_BxLxKxDh.shape != k_BxLxKxDh.shape:
    raise ValueError(f"flash_attention: k {k_BxLxKxDh.shape} and v {v_BxLxKxDh.shape} must be "
                     f"[B, L, K, Dh] matching q {q_BxLxHxDh.shape}")
  if h % kv_heads:
    raise ValueError(f"flash_attention: {h} query heads are not a multiple of {kv_heads} "
                     "kv heads")
  if segment_ids_BxL.shape != (b, l):
    raise ValueError(f"flash_attention: segment ids {segment_ids_BxL.shape} must be {(b, l)}")
  for name, blk in (("block_q", block_q), ("block_kv", block_kv)):
    if blk <= 0 or blk % LANES:
      raise ValueError(f"flash_attention: {name}={blk} must be a positive multiple of {LANES}")
  block_q = min(block_q, _round_up(l, LANES))
  block_kv = min(block_kv, _round_up(l, LANES))
  length = _round_up(l, math.lcm(block_q, block_kv))
  plan = Plan(b, h, kv_heads, length, dh, block_q, block_kv, causal,
               dh ** -0.5 if scale is None else float(scale), dh % LANES == 0, interpret)

  pad = length - l
  seg_BxL = segment_ids_BxL.astype(jnp.int32)
  if pad:
    q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh = (
        jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        for x in (q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh))
    seg_BxL = jnp.pad(seg_BxL, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)
  out = _flash(_to_kernel(q_BxLxHxDh, plan), _to_kernel(k_BxLxKxDh, plan),
               _to_kernel(v_BxLxKxDh, plan), _segments(seg_BxL, plan), plan)
  return _from_kernel(out, plan, h)[:, :l]


def _to_kernel(x_BxLxNxDh: jax.Array, plan: Plan) -> jax.Array:
  b, l, n, dh = x_BxLxNxDh.shape
  if plan.lane_layout:
    return x_BxLxNxDh.reshape(b, l, n * dh)
  return jnp.swapaxes(x_BxLxNxDh, 1, 2)


def _from_kernel(x: jax.Array, plan: Plan, n: int) -> jax.Array:
  if plan.lane_layout:
    return x.reshape(x.shape[0], x.shape[1], n, plan.head_dim)
  return jnp.swapaxes(x, 1, 2)


def _segments(seg_BxL: jax.Array, plan: Plan) -> Segments:
  """Segment ids as a column (rows of a block) and a row (columns), and per-block ranges."""
  b, l = seg_BxL.shape
  col_BxLx128 = jax.lax.broadcast_in_dim(seg_BxL, (b, l, LANES), (0, 1))
  row_Bx8xL = jax.lax.broadcast_in_dim(seg_BxL, (b, SUBLANES, l), (0, 2))

  def ranges(block: int) -> tuple[jax.Array, jax.Array]:
    blocks = seg_BxL.reshape(b, l // block, block)
    return blocks.min(-1).reshape(-1), blocks.max(-1).reshape(-1)

  return (*ranges(plan.block_q), *ranges(plan.block_kv), col_BxLx128, row_Bx8xL)


# ---------------------------------------------------------------------------------------------
# The custom VJP over the kernel layouts (padding and layout changes stay outside it).


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q: jax.Array, k: jax.Array, v: jax.Array, segs: Segments, plan: Plan) -> jax.Array:
  return forward(q, k, v, segs, plan)[0]


def _flash_fwd(q: jax.Array, k: jax.Array, v: jax.Array, segs: Segments,
               plan: Plan) -> tuple[jax.Array, tuple[jax.Array | Segments, ...]]:
  out, lse = forward(q, k, v, segs, plan)
  return out, (q, k, v, segs, out, lse)


def _flash_bwd(plan: Plan, res: tuple[Any, ...], do: jax.Array) -> tuple[Any, ...]:
  q, k, v, segs, out, lse = res
  dq, di = backward_dq(q, k, v, out, do, lse, segs, plan)
  dk, dv = backward_dkv(q, k, v, do, lse, di, segs, plan)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
