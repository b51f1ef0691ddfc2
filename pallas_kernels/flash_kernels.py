"""The three Pallas TPU kernels of flash attention (forward, dq, dk/dv) and their block specs.

`flash_attention.py` is the interface: it pads, lays out and differentiates; this file holds
what runs on the chip. Every kernel walks a grid whose last axis is a reduction (key blocks
for the forward and dq, query blocks for dk/dv) with float32 running state in VMEM scratch;
`Plan` carries the static shapes. Segment ids arrive twice: as a lane-replicated column
[B, L, 128] (ids of a block's rows) and a sublane-replicated row [B, 8, L] (ids of its
columns), the tile shapes Mosaic compares without relayout; their per-block min/max come in
by scalar prefetch (SMEM) to decide which blocks run at all.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
SUBLANES = 8
# Finite, so exp(MASK - m) is exactly 0 and nothing overflows (the reference uses the same).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
PAD_SEGMENT = int(np.iinfo(np.int32).min)  # slots added to fill the last block
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static shape facts every kernel and index map needs."""

  batch: int
  heads: int
  kv_heads: int
  length: int  # padded
  head_dim: int
  block_q: int
  block_kv: int
  causal: bool
  scale: float
  lane_layout: bool  # [B, L, heads * Dh] (True) or [B, heads, L, Dh]
  interpret: bool | None

  @property
  def group(self) -> int:
    return self.heads // self.kv_heads

  @property
  def num_q(self) -> int:
    return self.length // self.block_q

  @property
  def num_kv(self) -> int:
    return self.length // self.block_kv


IndexMap = Callable[..., tuple[jax.Array, ...]]
Segments = tuple[jax.Array, ...]  # 4 block-range vectors, the id column and the id row


# ---------------------------------------------------------------------------------------------
# Block visibility, shared by the kernels and their index maps.


def _last_kv_block(plan: Plan, i: jax.Array) -> jax.Array:
  """The last key block that query block i can see (causally)."""
  if not plan.causal:
    return jnp.int32(plan.num_kv - 1)
  return (i * plan.block_q + plan.block_q - 1) // plan.block_kv


def _first_q_block(plan: Plan, j: jax.Array) -> jax.Array:
  """The first query block that can see key block j (causally)."""
  if not plan.causal:
    return jnp.int32(0)
  return (j * plan.block_kv) // plan.block_q


def _block_kind(plan: Plan, ranges: tuple[Any, ...], b: jax.Array, i: jax.Array,
                j: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(visible, needs_mask) for query block i against key block j of batch row b."""
  q_min, q_max, kv_min, kv_max = (r[b * n + x] for r, n, x in zip(
      ranges, (plan.num_q, plan.num_q, plan.num_kv, plan.num_kv), (i, i, j, j)))
  visible = jnp.logical_and(q_min <= kv_max, kv_min <= q_max)
  one_segment = jnp.logical_and(jnp.logical_and(q_min == q_max, kv_min == kv_max),
                                q_min == kv_min)
  if plan.causal:
    visible = jnp.logical_and(visible, j <= _last_kv_block(plan, i))
    below = j * plan.block_kv + plan.block_kv - 1 <= i * plan.block_q
    one_segment = jnp.logical_and(one_segment, below)
  return visible, jnp.logical_not(one_segment)


def _mask(q_seg: jax.Array, kv_seg: jax.Array, q_pos: jax.Array, kv_pos: jax.Array,
          causal: bool) -> jax.Array:
  mask = q_seg == kv_seg
  if causal:
    mask = jnp.logical_and(mask, q_pos >= kv_pos)
  return mask


def _lanes(x_Nx128: jax.Array, width: int) -> jax.Array:
  """A lane-replicated column [N, 128] widened (or narrowed) to [N, width]."""
  if width == LANES:
    return x_Nx128
  if width % LANES == 0:
    return jnp.tile(x_Nx128, (1, width // LANES))
  if width < LANES:
    return x_Nx128[:, :width]
  raise ValueError(f"flash_attention: width {width} must be below {LANES} or a multiple of it")


def _column(row_1xN: jax.Array) -> jax.Array:
  """A row [1, N] as a lane-replicated column [N, 128]."""
  return jnp.transpose(jnp.broadcast_to(row_1xN, (LANES, row_1xN.shape[1])))


def _row(column_Nx128: jax.Array) -> jax.Array:
  """A lane-replicated column [N, 128] as a row [1, N]."""
  return jnp.transpose(column_Nx128)[:1]


def _row_grid(plan: Plan) -> tuple[int, int, int]:
  """Forward and dq: (batch x head, query block, key block). Batch and head share the leading
  (parallel) axis so a megacore chip can split it evenly even at one row per device."""
  return plan.batch * plan.heads, plan.num_q, plan.num_kv


def _row_coords(plan: Plan, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  return t // plan.heads, t % plan.heads  # batch row, query head


def _column_grid(plan: Plan) -> tuple[int, int, int]:
  """dk/dv: (batch x kv head x key block, group member, query block)."""
  return plan.batch * plan.kv_heads * plan.num_kv, plan.group, plan.num_q


def _column_coords(plan: Plan, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch row, kv head and key block of the leading grid index. Key blocks run in the order
  0, n-1, 1, n-2, ...: causal work per key block falls with its index, so each half of the
  axis (one per core of a megacore chip) gets an even share."""
  r = t % plan.num_kv
  j = jnp.where(r % 2 == 0, r // 2, plan.num_kv - 1 - r // 2)
  return t // (plan.kv_heads * plan.num_kv), (t // plan.num_kv) % plan.kv_heads, j


def _run_block(plan: Plan, ranges: tuple[Any, ...], b: jax.Array, i: jax.Array,
               j: jax.Array, body: Callable[[bool], None]) -> None:
  """Calls body(masked) for a visible block; the mask is built only where it matters."""
  visible, needs_mask = _block_kind(plan, ranges, b, i, j)

  @pl.when(jnp.logical_and(visible, needs_mask))
  def _():
    body(True)

  @pl.when(jnp.logical_and(visible, jnp.logical_not(needs_mask)))
  def _():
    body(False)


# ---------------------------------------------------------------------------------------------
# Block specs. A "sequence block" of q/k/v/o is [block, Dh] of one head.


def _seq_spec(plan: Plan, block: int, where: IndexMap) -> pl.BlockSpec:
  """where(*grid, *prefetch) -> (batch, head, block index)."""
  if plan.lane_layout:
    return pl.BlockSpec((None, block, plan.head_dim),
                        lambda *a: (lambda b, n, s: (b, s, n))(*where(*a)))
  return pl.BlockSpec((None, None, block, plan.head_dim),
                      lambda *a: (lambda b, n, s: (b, n, s, 0))(*where(*a)))


def _seq_shape(plan: Plan, heads: int, dtype: Any) -> jax.ShapeDtypeStruct:
  if plan.lane_layout:
    return jax.ShapeDtypeStruct((plan.batch, plan.length, heads * plan.head_dim), dtype)
  return jax.ShapeDtypeStruct((plan.batch, heads, plan.length, plan.head_dim), dtype)


def _column_spec(block: int, where: IndexMap) -> pl.BlockSpec:  # segment ids [B, L, 128]
  return pl.BlockSpec((None, block, LANES),
                      lambda *a: (lambda b, s: (b, s, 0))(*where(*a)))


def _row_spec(block: int, where: IndexMap) -> pl.BlockSpec:  # segment ids [B, 8, L]
  return pl.BlockSpec((None, SUBLANES, block),
                      lambda *a: (lambda b, s: (b, 0, s))(*where(*a)))


def _stat_spec(block: int, where: IndexMap) -> pl.BlockSpec:  # logsumexp and di [B, H, 1, L]
  return pl.BlockSpec((None, None, 1, block),
                      lambda *a: (lambda b, n, s: (b, n, 0, s))(*where(*a)))


def _pallas(plan: Plan, kernel: Callable[..., None], *, grid: tuple[int, ...],
            in_specs: list[pl.BlockSpec], out_specs: Any, out_shape: Any, scratch: list[Any],
            semantics: tuple[str, ...], cost: pl.CostEstimate, name: str) -> Callable[..., Any]:
  """pallas_call with Mosaic on TPU and the interpreter elsewhere (or as `interpret` says)."""
  def build(interpret: bool) -> Callable[..., Any]:
    return pl.pallas_call(
        kernel, out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        cost_estimate=cost, interpret=interpret, name=name)

  if plan.interpret is not None:
    return build(plan.interpret)
  return lambda *args: jax.lax.platform_dependent(
      *args, tpu=build(False), default=build(True))


def _cost(plan: Plan, matmuls: int, exps: int, arrays: list[Any]) -> pl.CostEstimate:
  pairs = plan.batch * plan.heads * plan.length * plan.length // (2 if plan.causal else 1)
  return pl.CostEstimate(flops=2 * matmuls * pairs * plan.head_dim,
                         transcendentals=exps * pairs,
                         bytes_accessed=sum(math.prod(a.shape) * a.dtype.itemsize
                                            for a in arrays))


# ---------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs: Any, plan: Plan) -> None:
  ranges, refs = refs[:4], refs[4:]
  (q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref,
   m_scr, l_scr, acc_scr) = refs
  t, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  b, _ = _row_coords(plan, t)
  bq, bk = plan.block_q, plan.block_kv

  @pl.when(j == 0)
  def _():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def body(masked: bool) -> None:
    s_QxK = jax.lax.dot_general(q_ref[...], k_ref[...], _NT,
                                preferred_element_type=jnp.float32) * plan.scale
    if masked:
      q_pos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
      kv_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
      mask = _mask(_lanes(q_seg_ref[...], bk), kv_seg_ref[:1], q_pos, kv_pos, plan.causal)
      s_QxK = jnp.where(mask, s_QxK, MASK_VALUE)
    m_prev = m_scr[...]
    m_next = jnp.maximum(m_prev, jnp.max(s_QxK, axis=1, keepdims=True))  # [bq, 128]
    # A row whose keys so far are all masked has m = MASK_VALUE and sums exp(0) = 1 per
    # masked key; its own (diagonal) key comes later and alpha = exp(MASK - m) = 0 wipes it.
    p_QxK = jnp.exp(s_QxK - _lanes(m_next, bk))
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p_QxK, axis=1, keepdims=True)
    m_scr[...] = m_next
    v = v_ref[...]
    pv = jax.lax.dot_general(p_QxK.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
    acc_scr[...] = _lanes(alpha, plan.head_dim) * acc_scr[...] + pv

  _run_block(plan, ranges, b, i, j, body)

  @pl.when(j == plan.num_kv - 1)
  def _():
    l = l_scr[...]
    l = jnp.where(l == 0.0, 1.0, l)  # never 0 (the diagonal), but stay finite regardless
    o_ref[...] = (acc_scr[...] / _lanes(l, plan.head_dim)).astype(o_ref.dtype)
    lse_ref[...] = _row(m_scr[...] + jnp.log(l))


def forward(q: jax.Array, k: jax.Array, v: jax.Array, segs: Segments,
            plan: Plan) -> tuple[jax.Array, jax.Array]:
  """(out, logsumexp [B, H, 1, L]) in the kernel layout."""
  *ranges, seg_col, seg_row = segs
  g, bq, bk = plan.group, plan.block_q, plan.block_kv

  def q_at(t, i, j, *_):
    return *_row_coords(plan, t), i

  def kv_at(t, i, j, *_):
    b, h = _row_coords(plan, t)
    return b, h // g, jnp.minimum(j, _last_kv_block(plan, i))

  in_specs = [_seq_spec(plan, bq, q_at), _seq_spec(plan, bk, kv_at), _seq_spec(plan, bk, kv_at),
              _column_spec(bq, lambda *a: (q_at(*a)[0], q_at(*a)[2])),
              _row_spec(bk, lambda *a: (kv_at(*a)[0], kv_at(*a)[2]))]
  out_shape = [_seq_shape(plan, plan.heads, q.dtype),
               jax.ShapeDtypeStruct((plan.batch, plan.heads, 1, plan.length), jnp.float32)]
  out_specs = [_seq_spec(plan, bq, q_at), _stat_spec(bq, q_at)]
  scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
             pltpu.VMEM((bq, plan.head_dim), jnp.float32)]
  call = _pallas(plan, functools.partial(_fwd_kernel, plan=plan),
                 grid=_row_grid(plan), in_specs=in_specs, out_specs=out_specs,
                 out_shape=out_shape, scratch=scratch,
                 semantics=("parallel", "parallel", "arbitrary"),
                 cost=_cost(plan, 2, 1, [q, k, v, q]), name="flash_attention_fwd")
  out, lse = call(*ranges, q, k, v, seg_col, seg_row)
  return out, lse


# ---------------------------------------------------------------------------------------------
# Backward: dq.


def _dq_kernel(*refs: Any, plan: Plan) -> None:
  ranges, refs = refs[:4], refs[4:]
  (q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, q_seg_ref, kv_seg_ref, dq_ref, di_ref,
   lse_scr, di_scr, dq_scr) = refs
  t, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  b, _ = _row_coords(plan, t)
  bq, bk = plan.block_q, plan.block_kv

  @pl.when(j == 0)
  def _():
    lse_scr[...] = _column(lse_ref[...])
    # di = rowsum(dO * O), the softmax-backward term; made here from blocks already in VMEM
    # rather than by XLA, which would materialize float32 copies of O and dO.
    di = jnp.sum(do_ref[...].astype(jnp.float32) * o_ref[...].astype(jnp.float32), axis=1,
                 keepdims=True)
    di_scr[...] = jnp.broadcast_to(di, di_scr.shape)
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def body(masked: bool) -> None:
    k = k_ref[...]
    s_QxK = jax.lax.dot_general(q_ref[...], k, _NT,
                                preferred_element_type=jnp.float32) * plan.scale
    if masked:
      q_pos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
      kv_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
      mask = _mask(_lanes(q_seg_ref[...], bk), kv_seg_ref[:1], q_pos, kv_pos, plan.causal)
      s_QxK = jnp.where(mask, s_QxK, MASK_VALUE)
    p_QxK = jnp.exp(s_QxK - _lanes(lse_scr[...], bk))
    dp_QxK = jax.lax.dot_general(do_ref[...], v_ref[...], _NT,
                                 preferred_element_type=jnp.float32)
    ds_QxK = p_QxK * (dp_QxK - _lanes(di_scr[...], bk))
    dq_scr[...] += jax.lax.dot_general(ds_QxK.astype(k.dtype), k, _NN,
                                       preferred_element_type=jnp.float32)

  _run_block(plan, ranges, b, i, j, body)

  @pl.when(j == plan.num_kv - 1)
  def _():
    dq_ref[...] = (dq_scr[...] * plan.scale).astype(dq_ref.dtype)
    di_ref[...] = _row(di_scr[...])


def backward_dq(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, do: jax.Array,
                lse: jax.Array, segs: Segments, plan: Plan) -> tuple[jax.Array, jax.Array]:
  """(dq, di = rowsum(dO * O) [B, H, 1, L]); dk/dv need di."""
  *ranges, seg_col, seg_row = segs
  g, bq, bk = plan.group, plan.block_q, plan.block_kv

  def q_at(t, i, j, *_):
    return *_row_coords(plan, t), i

  def kv_at(t, i, j, *_):
    b, h = _row_coords(plan, t)
    return b, h // g, jnp.minimum(j, _last_kv_block(plan, i))

  in_specs = [_seq_spec(plan, bq, q_at), _seq_spec(plan, bk, kv_at), _seq_spec(plan, bk, kv_at),
              _seq_spec(plan, bq, q_at), _seq_spec(plan, bq, q_at), _stat_spec(bq, q_at),
              _column_spec(bq, lambda *a: (q_at(*a)[0], q_at(*a)[2])),
              _row_spec(bk, lambda *a: (kv_at(*a)[0], kv_at(*a)[2]))]
  out_shape = [_seq_shape(plan, plan.heads, q.dtype), jax.ShapeDtypeStruct(lse.shape, jnp.float32)]
  scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
             pltpu.VMEM((bq, plan.head_dim), jnp.float32)]
  call = _pallas(plan, functools.partial(_dq_kernel, plan=plan),
                 grid=_row_grid(plan), in_specs=in_specs,
                 out_specs=[_seq_spec(plan, bq, q_at), _stat_spec(bq, q_at)],
                 out_shape=out_shape, scratch=scratch,
                 semantics=("parallel", "parallel", "arbitrary"),
                 cost=_cost(plan, 3, 1, [q, k, v, out, do, q]), name="flash_attention_dq")
  dq, di = call(*ranges, q, k, v, out, do, lse, seg_col, seg_row)
  return dq, di


# ---------------------------------------------------------------------------------------------
# Backward: dk and dv, in the transposed orientation (key rows, query columns) so the saved
# row statistics broadcast along sublanes and every matmul is a plain or B-transposed one.


def _dkv_kernel(*refs: Any, plan: Plan) -> None:
  ranges, refs = refs[:4], refs[4:]
  (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, kv_seg_ref, q_seg_ref, dk_ref, dv_ref,
   dk_scr, dv_scr) = refs
  t, member, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  b, _, j = _column_coords(plan, t)
  bq, bk = plan.block_q, plan.block_kv

  @pl.when(jnp.logical_and(member == 0, i == 0))
  def _():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def body(masked: bool) -> None:
    q, do = q_ref[...], do_ref[...]
    s_KxQ = jax.lax.dot_general(k_ref[...], q, _NT,
                                preferred_element_type=jnp.float32) * plan.scale
    if masked:
      kv_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
      q_pos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
      mask = _mask(q_seg_ref[:1], _lanes(kv_seg_ref[...], bq), q_pos, kv_pos, plan.causal)
      s_KxQ = jnp.where(mask, s_KxQ, MASK_VALUE)
    p_KxQ = jnp.exp(s_KxQ - lse_ref[...])
    dv_scr[...] += jax.lax.dot_general(p_KxQ.astype(do.dtype), do, _NN,
                                       preferred_element_type=jnp.float32)
    dp_KxQ = jax.lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
    ds_KxQ = p_KxQ * (dp_KxQ - di_ref[...])
    dk_scr[...] += jax.lax.dot_general(ds_KxQ.astype(q.dtype), q, _NN,
                                       preferred_element_type=jnp.float32)

  _run_block(plan, ranges, b, i, j, body)

  @pl.when(jnp.logical_and(member == plan.group - 1, i == plan.num_q - 1))
  def _():
    dk_ref[...] = (dk_scr[...] * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward_dkv(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, lse: jax.Array,
                 di: jax.Array, segs: Segments, plan: Plan) -> tuple[jax.Array, jax.Array]:
  *ranges, seg_col, seg_row = segs
  g, bq, bk = plan.group, plan.block_q, plan.block_kv

  def q_at(t, member, i, *_):
    b, kh, j = _column_coords(plan, t)
    return b, kh * g + member, jnp.maximum(i, _first_q_block(plan, j))

  def kv_at(t, member, i, *_):
    return _column_coords(plan, t)

  in_specs = [_seq_spec(plan, bq, q_at), _seq_spec(plan, bk, kv_at), _seq_spec(plan, bk, kv_at),
              _seq_spec(plan, bq, q_at), _stat_spec(bq, q_at), _stat_spec(bq, q_at),
              _column_spec(bk, lambda *a: (kv_at(*a)[0], kv_at(*a)[2])),
              _row_spec(bq, lambda *a: (q_at(*a)[0], q_at(*a)[2]))]
  out_shape = [_seq_shape(plan, plan.kv_heads, k.dtype), _seq_shape(plan, plan.kv_heads, v.dtype)]
  scratch = [pltpu.VMEM((bk, plan.head_dim), jnp.float32),
             pltpu.VMEM((bk, plan.head_dim), jnp.float32)]
  call = _pallas(plan, functools.partial(_dkv_kernel, plan=plan),
                 grid=_column_grid(plan),
                 in_specs=in_specs,
                 out_specs=[_seq_spec(plan, bk, kv_at), _seq_spec(plan, bk, kv_at)],
                 out_shape=out_shape, scratch=scratch,
                 semantics=("parallel", "arbitrary", "arbitrary"),
                 cost=_cost(plan, 4, 1, [q, k, v, do, k, v]), name="flash_attention_dkv")
  dk, dv = call(*ranges, q, k, v, do, lse, di, seg_col, seg_row)
  return dk, dv
