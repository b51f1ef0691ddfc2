"""The released WhisperVQ tokenizer's encoder, up to its quantizer, in Flax NNX.

  log-mel [B, F, M] of a window zero-padded to whole tokens (100 Hz)
    -> conv1 (k3) + GELU -> conv2 (k3, stride 2) + GELU          [B, T, D] (50 Hz), T = F / 2
       (causal convolutions pad two frames on the left only; else one on each side)
    -> + embed_positions[:T] (a learned table in the checkpoint)
    -> layers 0 .. pooling_position - 1 (Whisper's pre-LN layers, sptlm.speech.model.Layers)
    -> average pooling x4                                         [B, N, D] (12.5 Hz)
    -> layers pooling_position .. quantize_position - 1 (often none)
    -> nearest code of the raw (unnormalized) vectors, squared Euclidean   => codes [B, N]

Attention masks, as the reference builds them: a key must be a real frame (its 10 ms mel frame
starts inside the audio), and with quantize_causal_block_size also in the query's block of
that many 50 Hz frames or an earlier one (block // 4 after the pooling); with
encoder_causal_attention (or quantize_causal_encoder) plain frame-causal attention and no
padding mask, as the reference's causal SDPA path. Padding frames inside the last token are
computed too and averaged into it, as in the reference. The layers above the quantizer, the
final layer_norm and embed_positions2 serve ASR training only and are not built.

Legend: B batch, F mel frames, M mel bins, T encoder frames (50 Hz), N tokens (12.5 Hz),
D model, K codebook size.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from sptlm.model import nnx_compat
from sptlm.speech import model as speech_model
from sptlm.speech.config import EncoderConfig
from sptlm.speech.whisper_vq.config import POOL, WhisperVQConfig

SAMPLES_PER_FRAME = 320  # one 50 Hz encoder frame: two 10 ms mel frames
SAMPLES_PER_TOKEN = SAMPLES_PER_FRAME * POOL


def layer_config(cfg: WhisperVQConfig) -> EncoderConfig:
  """sptlm's Whisper layer settings for this width (float32 throughout: parity first)."""
  return EncoderConfig(
      num_mels=cfg.num_mel_bins, d_model=cfg.d_model, num_heads=cfg.num_heads,
      d_ff=cfg.ffn_dim, layers_before_vq=cfg.quantize_position, layers_after_vq=0, pool=POOL,
      block_causal_seconds=0.0, causal_stem=cfg.causal_convolution, max_seconds=30.0,
      ctc_upsample=1, dtype="float32", param_dtype="float32", init_std=0.02)


def _zeros(names: tuple[str | None, ...]):
  return nnx_compat.init(jax.nn.initializers.zeros, names)


class Conv(nnx.Module):
  """Kernel-3 convolution: 'same' padding, or (causal) two frames of left padding only."""

  def __init__(self, in_dim: int, out_dim: int, stride: int, causal: bool, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_zeros((None, None, "embed"))(rngs.params(), (3, in_dim, out_dim)))
    self.bias = nnx.Param(_zeros(("act_embed",))(rngs.params(), (out_dim,)))
    self.stride, self.causal = stride, causal

  def __call__(self, x_BxLxC: jax.Array) -> jax.Array:
    pad = (2, 0) if self.causal else (1, 1)
    y = jax.lax.conv_general_dilated(x_BxLxC, self.kernel.value, (self.stride,), [pad],
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return y + self.bias.value


def attention_mask(cfg: WhisperVQConfig, valid_BxL: jax.Array, block: int) -> jax.Array:
  """[B, L, L] boolean: which keys each query sees (see the module docstring)."""
  if cfg.causal_attention:
    length = valid_BxL.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return jnp.broadcast_to(causal, (valid_BxL.shape[0], length, length))
  return speech_model.attention_mask(valid_BxL, block)


class WhisperVQEncoder(nnx.Module):
  def __init__(self, cfg: WhisperVQConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.d_model
    layers = layer_config(cfg)
    self.conv1 = Conv(cfg.num_mel_bins, d, 1, cfg.causal_convolution, rngs=rngs)
    self.conv2 = Conv(d, d, 2, cfg.causal_convolution, rngs=rngs)
    self.embed_positions = nnx.Param(
        _zeros((None, "act_embed"))(rngs.params(), (cfg.max_source_positions, d)))
    self.layers = speech_model.Layers(layers, cfg.pooling_position, rngs=rngs)
    self.pooled_layers = speech_model.Layers(layers, cfg.quantize_position - cfg.pooling_position,
                                             rngs=rngs)
    self.codebook = nnx.Param(_zeros(("codebook", "act_embed"))(rngs.params(),
                                                                (cfg.codebook_size, d)))

  def hidden(self, mel_BxFxM: jax.Array, samples_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(what the quantizer sees [B, N, D] float32, valid tokens [B, N]); F = 8 N, and
    samples_B is each window's length in samples before the padding to whole tokens."""
    cfg = self.cfg
    b = mel_BxFxM.shape[0]
    x = jax.nn.gelu(self.conv1(mel_BxFxM.astype(jnp.float32)), approximate=False)
    x_BxTxD = jax.nn.gelu(self.conv2(x), approximate=False)
    t = x_BxTxD.shape[1]
    x_BxTxD = x_BxTxD + self.embed_positions.value[:t]
    valid_BxT = jnp.arange(t)[None, :] * SAMPLES_PER_FRAME < samples_B[:, None]
    x_BxTxD = self.layers(x_BxTxD, attention_mask(cfg, valid_BxT, cfg.block_size))
    n = t // POOL
    h_BxNxD = x_BxTxD.reshape(b, n, POOL, cfg.d_model).mean(axis=2)
    valid_BxN = jnp.arange(n)[None, :] * SAMPLES_PER_TOKEN < samples_B[:, None]
    h_BxNxD = self.pooled_layers(h_BxNxD, attention_mask(cfg, valid_BxN, cfg.block_size // POOL))
    return h_BxNxD, valid_BxN

  def nearest(self, h_BxNxD: jax.Array) -> jax.Array:
    """The reference's rule: argmin over codes of (|e|^2 + |h|^2) - 2 h.e (first on ties)."""
    e_KxD = self.codebook.value
    dots_BxNxK = jnp.einsum("bnd,kd->bnk", h_BxNxD, e_KxD)
    dist_BxNxK = (jnp.sum(e_KxD * e_KxD, -1) + jnp.sum(h_BxNxD * h_BxNxD, -1, keepdims=True)
                  - 2.0 * dots_BxNxK)
    return jnp.argmin(dist_BxNxK, axis=-1).astype(jnp.int32)

  def __call__(self, mel_BxFxM: jax.Array, samples_B: jax.Array) -> jax.Array:
    """Codes [B, N] (padding tokens hold arbitrary codes)."""
    return self.nearest(self.hidden(mel_BxFxM, samples_B)[0])


def abstract(cfg: WhisperVQConfig) -> WhisperVQEncoder:
  return nnx.eval_shape(lambda: WhisperVQEncoder(cfg, rngs=nnx.Rngs(0)))
