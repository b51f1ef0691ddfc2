"""The vector-quantized bottleneck: nearest-code lookup, straight-through gradients, an EMA
codebook (decay 0.99 in the paper) and random restart of dead codes.

The codebook is not a `nnx.Param`: the optimizer never sees it. It moves by exponential moving
averages of the encoder outputs assigned to each code (van den Oord et al. 2017, appendix), and
a code left unused for `restart_after` steps is re-seeded with a random (real, unpadded)
encoder output of the current batch. All codes start unused, so the first step seeds the whole
codebook from data. Counting steps without use, rather than waiting for an EMA count to decay,
catches a collapse (every output drifting onto one code, early in training) within
`restart_after` steps instead of hundreds.

Legend: B batch, N tokens, D model, K codebook size, M = B * N.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sptlm.model import nnx_compat


class CodebookState(nnx.Variable):
  """EMA-updated quantizer state (codebook, usage, sums): trained without gradients."""


class VQOutput(NamedTuple):
  quantized_BxNxD: jax.Array  # straight-through: forward = code vector, backward = identity
  codes_BxN: jax.Array  # int32 in [0, K)
  commitment_BxN: jax.Array  # ||h - sg(e)||^2 / D per token


def l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


class VectorQuantizer(nnx.Module):
  """normalize=True: codes and inputs live on the unit sphere (nearest = highest cosine), as in
  Yu et al. 2021's improved VQGAN: no code wins by norm alone and usage stays high."""

  def __init__(self, size: int, dim: int, *, rngs: nnx.Rngs, normalize: bool = False):
    self.normalize = normalize
    init = nnx_compat.init(jax.nn.initializers.normal(1.0), ("codebook", "embed"))
    self.codebook = CodebookState(init(rngs.params(), (size, dim), jnp.float32))
    zeros = nnx_compat.init(jax.nn.initializers.zeros, ("codebook",))
    self.ema_counts = CodebookState(zeros(rngs.params(), (size,), jnp.float32))
    zeros2 = nnx_compat.init(jax.nn.initializers.zeros, ("codebook", "embed"))
    self.ema_sums = CodebookState(zeros2(rngs.params(), (size, dim), jnp.float32))
    never = nnx_compat.init(jax.nn.initializers.constant(1 << 30), ("codebook",))
    self.unused_steps = CodebookState(never(rngs.params(), (size,), jnp.int32))

  def codes(self) -> jax.Array:
    e_KxD = self.codebook.value
    return l2_normalize(e_KxD) if self.normalize else e_KxD

  def lookup(self, codes_BxN: jax.Array) -> jax.Array:
    return jnp.take(self.codes(), codes_BxN, axis=0)

  def nearest(self, h_BxNxD: jax.Array) -> jax.Array:
    """Index of the nearest code (squared Euclidean distance, in float32; inputs normalized
    first when the codes are)."""
    h = l2_normalize(h_BxNxD) if self.normalize else h_BxNxD.astype(jnp.float32)
    e_KxD = self.codes()
    dist_BxNxK = (jnp.sum(h * h, -1, keepdims=True) - 2.0 * jnp.einsum("bnd,kd->bnk", h, e_KxD)
                  + jnp.sum(e_KxD * e_KxD, -1))
    return jnp.argmin(dist_BxNxK, axis=-1).astype(jnp.int32)

  def __call__(self, h_BxNxD: jax.Array) -> VQOutput:
    """h: the encoder output in code space (normalized here when the codes are)."""
    codes_BxN = self.nearest(h_BxNxD)
    e_BxNxD = jax.lax.stop_gradient(self.lookup(codes_BxN))
    h = l2_normalize(h_BxNxD) if self.normalize else h_BxNxD.astype(jnp.float32)
    commitment_BxN = jnp.mean(jnp.square(h - e_BxNxD), axis=-1)
    quantized = h + jax.lax.stop_gradient(e_BxNxD - h)
    return VQOutput(quantized.astype(h_BxNxD.dtype), codes_BxN, commitment_BxN)


class Stats(NamedTuple):
  usage: jax.Array  # fraction of codes used within the last restart_after steps
  perplexity: jax.Array  # exp(entropy) of this batch's code histogram
  restarted: jax.Array  # codes re-seeded at this step


def ema_update(state: dict, h_BxNxD: jax.Array, codes_BxN: jax.Array, valid_BxN: jax.Array, *,
               decay: float, restart_after: int, key: jax.Array) -> tuple[dict, Stats]:
  """New {codebook, ema_counts, ema_sums, unused_steps} after one batch, dead codes re-seeded.

  `state` is the quantizer's pure-dict state; `h` the (stop-gradient) encoder outputs that were
  quantized, `valid` 1.0 for real tokens and 0.0 for padding.
  """
  codebook, counts, sums = state["codebook"], state["ema_counts"], state["ema_sums"]
  unused = state["unused_steps"]
  k, d = codebook.shape
  h_MxD = jax.lax.stop_gradient(h_BxNxD).reshape(-1, d).astype(jnp.float32)
  w_M = valid_BxN.reshape(-1).astype(jnp.float32)
  codes_M = codes_BxN.reshape(-1)
  batch_counts_K = jax.ops.segment_sum(w_M, codes_M, num_segments=k)
  batch_sums_KxD = jax.ops.segment_sum(h_MxD * w_M[:, None], codes_M, num_segments=k)
  counts = decay * counts + (1.0 - decay) * batch_counts_K
  sums = decay * sums + (1.0 - decay) * batch_sums_KxD
  live = counts > 1e-8
  codebook = jnp.where(live[:, None], sums / jnp.where(live, counts, 1.0)[:, None], codebook)

  unused = jnp.where(batch_counts_K > 0, 0, jnp.minimum(unused, 1 << 30) + 1)
  dead = unused >= restart_after
  mean = jnp.mean(counts)
  pick_K = jax.random.choice(key, h_MxD.shape[0], (k,), p=w_M / jnp.maximum(w_M.sum(), 1.0))
  seeds_KxD = h_MxD[pick_K]
  codebook = jnp.where(dead[:, None], seeds_KxD, codebook)
  counts = jnp.where(dead, mean, counts)
  sums = jnp.where(dead[:, None], seeds_KxD * mean, sums)
  unused = jnp.where(dead, 0, unused)

  p_K = batch_counts_K / jnp.maximum(batch_counts_K.sum(), 1.0)
  perplexity = jnp.exp(-jnp.sum(jnp.where(p_K > 0, p_K * jnp.log(jnp.maximum(p_K, 1e-30)), 0.0)))
  stats = Stats(jnp.mean(unused < restart_after), perplexity, jnp.sum(dead))
  return {"codebook": codebook, "ema_counts": counts, "ema_sums": sums,
          "unused_steps": unused}, stats
