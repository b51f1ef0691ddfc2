"""Decoder-only transformer in Flax NNX (Llama family; GLM-4 and Qwen2 options).

Legend for the dimension letters in names:
  B batch, L length, S key/cache length, D model, H query heads, K kv heads, G = H / K,
  Dh head dim, F ffn, V vocab, N layers.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sptlm import sharding
from sptlm.config import ModelConfig
from sptlm.model import attention, nnx_compat
from sptlm.model.rotary import apply_rotary

# Named rematerialization policies: what the backward pass may keep instead of recomputing.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no jax.checkpoint: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class KVCache(NamedTuple):
  """Keys and values of earlier positions, for incremental decoding.

  One array per layer, heads before slots ([B, K, S, Dh]): a decode step then writes each
  layer's buffer in place and the attention dots read it as laid out. A stacked [N, B, S, K, Dh]
  cache cost a copy of the whole cache per step (the layer slice and the transpose), which made
  a CPU decode step linear in the batch (200 ms at batch 128 for the tiny t2t; now 39 ms).
  `index` is the next slot to write: a scalar when every row writes the same slot (one in-place
  slice), or [B] for a slot per row (a scatter), so a row can be refilled with a new prompt
  while the others go on (continuous batching).
  """

  k: tuple[jax.Array, ...]  # per layer [B, K, S, Dh]
  v: tuple[jax.Array, ...]
  segment_ids_BxS: jax.Array  # 0 marks an empty (or left-padding) slot
  index: jax.Array  # [] or [B]: the next slot to write


def _normal(cfg: ModelConfig, std: float | None = None):
  return jax.nn.initializers.normal(std or cfg.init_std)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.eps = cfg.norm_eps
    self.scale = nnx.Param(nnx_compat.init(jax.nn.initializers.ones, ("act_embed",))(
        rngs.params(), (dim,), DTYPES[cfg.param_dtype]))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale.value.astype(jnp.float32)).astype(x_BxLxD.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt = DTYPES[cfg.param_dtype]

    def param(shape, names, init=None):
      init = init or _normal(cfg)
      return nnx.Param(nnx_compat.init(init, names)(rngs.params(), shape, pdt))

    self.q = param((d, h, dh), ("embed", "heads", "head_dim"))
    self.k = param((d, k, dh), ("embed", "kv_heads", "head_dim"))
    self.v = param((d, k, dh), ("embed", "kv_heads", "head_dim"))
    self.o = param((h, dh, d), ("heads", "head_dim", "embed"))
    if cfg.qkv_bias:
      zeros = jax.nn.initializers.zeros
      self.q_bias = param((h, dh), ("heads", "head_dim"), zeros)
      self.k_bias = param((k, dh), ("kv_heads", "head_dim"), zeros)
      self.v_bias = param((k, dh), ("kv_heads", "head_dim"), zeros)

  def project(self, x_BxLxD: jax.Array, positions_BxL: jax.Array):
    """q, k, v with biases and rotary applied."""
    cfg, dt = self.cfg, x_BxLxD.dtype
    q_BxLxHxDh = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.q.value.astype(dt))
    k_BxLxKxDh = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.k.value.astype(dt))
    v_BxLxKxDh = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.v.value.astype(dt))
    if cfg.qkv_bias:
      q_BxLxHxDh += self.q_bias.value.astype(dt)
      k_BxLxKxDh += self.k_bias.value.astype(dt)
      v_BxLxKxDh += self.v_bias.value.astype(dt)
    rope = dict(theta=cfg.rope_theta, fraction=cfg.rope_fraction, style=cfg.rope_style)
    q_BxLxHxDh = apply_rotary(q_BxLxHxDh, positions_BxL, **rope)
    k_BxLxKxDh = apply_rotary(k_BxLxKxDh, positions_BxL, **rope)
    q_BxLxHxDh = sharding.constrain(q_BxLxHxDh, ("batch", "length", "heads", "head_dim"))
    return q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh

  def output(self, out_BxLxHxDh: jax.Array) -> jax.Array:
    out_BxLxHxDh = checkpoint_name(out_BxLxHxDh, "attention_out")
    return jnp.einsum("blhk,hkd->bld", out_BxLxHxDh, self.o.value.astype(out_BxLxHxDh.dtype))

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
               segment_ids_BxL: jax.Array) -> jax.Array:
    q, k, v = self.project(x_BxLxD, positions_BxL)
    backend = attention.get_backend(self.cfg.attention)
    return self.output(backend(q, k, v, segment_ids_BxL, **attention.backend_kwargs(self.cfg)))


class Mlp(nnx.Module):
  """SwiGLU feed-forward."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt, init = DTYPES[cfg.param_dtype], _normal(cfg)
    d, f = cfg.d_model, cfg.d_ff
    self.gate = nnx.Param(nnx_compat.init(init, ("embed", "mlp"))(rngs.params(), (d, f), pdt))
    self.up = nnx.Param(nnx_compat.init(init, ("embed", "mlp"))(rngs.params(), (d, f), pdt))
    self.down = nnx.Param(nnx_compat.init(init, ("mlp", "embed"))(rngs.params(), (f, d), pdt))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dt = x_BxLxD.dtype
    gate_BxLxF = x_BxLxD @ self.gate.value.astype(dt)
    up_BxLxF = x_BxLxD @ self.up.value.astype(dt)
    h_BxLxF = sharding.constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "length", "mlp"))
    return h_BxLxF @ self.down.value.astype(dt)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
               segment_ids_BxL: jax.Array) -> jax.Array:
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL)
    x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
    return sharding.constrain(x_BxLxD, ("batch", "length", "act_embed"))

  def decode(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, mask_BxLxS: jax.Array,
             k_BxKxSxDh: jax.Array, v_BxKxSxDh: jax.Array, index: jax.Array):
    """Like __call__, attending over the cache after writing this step's k/v at `index`."""
    q, k, v = self.attn.project(self.attn_norm(x_BxLxD), positions_BxL)
    k_BxKxSxDh = _write_rows(k_BxKxSxDh, k, index)
    v_BxKxSxDh = _write_rows(v_BxKxSxDh, v, index)
    out = attention.masked_attention(q, k_BxKxSxDh.astype(q.dtype), v_BxKxSxDh.astype(q.dtype),
                                     mask_BxLxS, heads_first=True)
    x_BxLxD = x_BxLxD + self.attn.output(out)
    x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
    return x_BxLxD, k_BxKxSxDh, v_BxKxSxDh


def _write_rows(cache_BxKxSxDh: jax.Array, new_BxLxKxDh: jax.Array,
                index: jax.Array) -> jax.Array:
  """The L new entries into slots index .. index + L - 1 (index scalar, or per row)."""
  new_BxKxLxDh = new_BxLxKxDh.astype(cache_BxKxSxDh.dtype).transpose(0, 2, 1, 3)
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache_BxKxSxDh, new_BxKxLxDh, index, axis=2)
  return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=1))(
      cache_BxKxSxDh, new_BxKxLxDh, index)


class Transformer(nnx.Module):
  """Token ids -> next-token logits, with packed-sequence positions and segment ids."""

  def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.vocab_size = vocab_size
    pdt = DTYPES[cfg.param_dtype]
    self.embed = nnx.Param(nnx_compat.init(_normal(cfg), ("vocab", "embed"))(
        rngs.params(), (vocab_size, cfg.d_model), pdt))
    self.layers = nnx_compat.stacked(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(nnx_compat.init(_normal(cfg), ("embed", "vocab"))(
          rngs.params(), (cfg.d_model, vocab_size), pdt))

  def embed_tokens(self, tokens_BxL: jax.Array) -> jax.Array:
    dt = DTYPES[self.cfg.dtype]
    x_BxLxD = jnp.take(self.embed.value, tokens_BxL, axis=0).astype(dt)
    return sharding.constrain(x_BxLxD, ("batch", "length", "act_embed"))

  def logits(self, x_BxLxD: jax.Array) -> jax.Array:
    x_BxLxD = self.final_norm(x_BxLxD)
    if self.cfg.tie_embeddings:
      w_DxV = self.embed.value.T
    else:
      w_DxV = self.lm_head.value
    logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, w_DxV.astype(x_BxLxD.dtype),
                              preferred_element_type=jnp.float32)
    return sharding.constrain(logits_BxLxV, ("batch", "length", "vocab"))

  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None) -> jax.Array:
    return self.logits(self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL))

  def hidden(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
             segment_ids_BxL: jax.Array | None = None) -> jax.Array:
    """The last block's output, before the final norm: what `logits` projects."""
    b, l = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l), (b, l))
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((b, l), jnp.int32)
    x_BxLxD = self.embed_tokens(tokens_BxL)
    graphdef, state = nnx.split(self.layers)

    def layer(x: jax.Array, layer_state: nnx.State) -> tuple[jax.Array, None]:
      return nnx.merge(graphdef, layer_state)(x, positions_BxL, segment_ids_BxL), None

    policy = REMAT_POLICIES[self.cfg.remat]
    if self.cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=not self.cfg.scan_layers)
    if self.cfg.scan_layers:
      x_BxLxD, _ = jax.lax.scan(layer, x_BxLxD, state)
    else:
      for i in range(self.cfg.num_layers):
        x_BxLxD, _ = layer(x_BxLxD, jax.tree.map(lambda a, i=i: a[i], state))
    return x_BxLxD

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache; every row writes the same slot until `index` is made per row."""
    cfg = self.cfg
    dtype = dtype or DTYPES[cfg.dtype]
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))

  def decode(self, tokens_BxL: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array,
             cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Runs L new tokens (a prompt, or one token) against the cache; returns logits, cache.

    Row b's tokens go in slots index (or index[b]) onwards and attend to that row's earlier
    slots of the same segment. The layers are unrolled (each has its own cache buffer)."""
    b, l = tokens_BxL.shape
    cache_seg_BxS = _write_seg(cache.segment_ids_BxS, segment_ids_BxL, cache.index)
    s = cache_seg_BxS.shape[1]
    q_idx_BxL = jnp.broadcast_to(jnp.reshape(cache.index, (-1, 1)) + jnp.arange(l), (b, l))
    kv_idx_BxS = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask_BxLxS = attention.segment_mask(segment_ids_BxL, cache_seg_BxS, q_idx_BxL, kv_idx_BxS)
    mask_BxLxS &= (cache_seg_BxS != 0)[:, None, :]
    x_BxLxD = self.embed_tokens(tokens_BxL)
    graphdef, state = nnx.split(self.layers)
    ks, vs = [], []
    for i, (k, v) in enumerate(zip(cache.k, cache.v)):
      block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
      x_BxLxD, k, v = block.decode(x_BxLxD, positions_BxL, mask_BxLxS, k, v, cache.index)
      ks.append(k)
      vs.append(v)
    return self.logits(x_BxLxD), KVCache(tuple(ks), tuple(vs), cache_seg_BxS, cache.index + l)


def _write_seg(seg_BxS: jax.Array, new_BxL: jax.Array, index: jax.Array) -> jax.Array:
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice_in_dim(seg_BxS, new_BxL, index, axis=1)
  return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))(
      seg_BxS, new_BxL, index)


def build(cfg: ModelConfig, vocab_size: int, seed: int) -> Transformer:
  return Transformer(cfg, vocab_size, rngs=nnx.Rngs(params=seed))


def count_params(state: nnx.State) -> int:
  return sum(x.size for x in jax.tree.leaves(state))
