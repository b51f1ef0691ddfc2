"""Rotary position embeddings: full or partial, rotate-half or interleaved pairs."""

import jax
import jax.numpy as jnp


def apply_rotary(x_BxLxNxDh: jax.Array, positions_BxL: jax.Array, *, theta: float,
                 fraction: float, style: str) -> jax.Array:
  """Rotates the first `fraction` of each head's dims by position; the rest pass through.

  `rotate_half` pairs dim i with i + R/2 (Llama, Qwen2); `interleaved` pairs 2i with 2i+1
  (GLM-4). Angles are computed in float32 whatever the compute dtype.
  """
  dh = x_BxLxNxDh.shape[-1]
  rot = int(dh * fraction)
  inv_freq_R2 = theta ** (-jnp.arange(0, rot, 2, dtype=jnp.float32) / rot)
  angle_BxLxR2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_R2
  sin = jnp.sin(angle_BxLxR2)[:, :, None, :]
  cos = jnp.cos(angle_BxLxR2)[:, :, None, :]
  x_rot = x_BxLxNxDh[..., :rot].astype(jnp.float32)
  if style == "rotate_half":
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  elif style == "interleaved":
    x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x_rot.shape)
  else:
    raise ValueError(f"unknown rope_style {style!r}")
  out = out.astype(x_BxLxNxDh.dtype)
  if rot == dh:
    return out
  return jnp.concatenate([out, x_BxLxNxDh[..., rot:]], axis=-1)
