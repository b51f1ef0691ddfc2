"""Whisper-style speech encoder with a VQ bottleneck: the 12.5 Hz supervised speech tokenizer.

  log-mel [B, 8N, 128] (100 Hz)
    [-> minus each bin's sliding mean (model.mel_norm_seconds)]
    -> conv1 (k3) + GELU -> conv2 (k3, stride 2) + GELU [-> + sinusoids]   [B, 4N, D] (50 Hz)
    (model.frontend="speech_embedding" instead: 32-bin log-mel -> frozen speech_embedding CNN
     [B, N, 96] -> layer norm -> one linear map per 50 Hz phase                [B, 4N, D];
     "moonshine_tiny": Moonshine's frozen ASR encoder [B, 8N, 288] (computed in the input
     pipeline) -> mean of frame pairs -> layer norm -> linear                   [B, 4N, D];
     "moonshine_tiny_mel": both, summed: Moonshine's 288 as above + the last 128 bins
     (log-mel) through conv1 -> conv2                                            [B, 4N, D])
    -> layers_before_vq (pre-LN transformer layers; positions=rope: rotary q, k instead)
    -> average pooling x4                                                     [B, N, D] (12.5 Hz)
    -> vector quantizer (EMA codebook)           => the tokens: codes [B, N] in [0, K)
    -> repeat x ctc_upsample + phase embedding + sinusoids
    -> layers_after_vq -> layer_norm -> CTC head                       [B, N * up, U + 1]

Tokenizing runs only up to the quantizer; the layers above it exist for the ASR loss that
keeps the words in the tokens (and for `transcribe`).

Why CTC over SentencePiece units rather than Whisper's attention decoder: CTC is one linear
layer over the frames above the bottleneck, trains and decodes without an autoregressive loop
(cheap on a 2-core CPU, greedy decoding is exact argmax), cannot hallucinate text the audio
does not support, and its monotonic frame-level alignment pushes each 80 ms token to carry the
words spoken in it. Subword units rather than letters because speech has about 15 letters a
second; SentencePiece units average about 3 letters (about 6 units a second). CTC needs a
frame per unit plus blanks, and learns slowly when the frames barely outnumber the units: at
12.5 Hz with 6 units a second it sat on the all-blank plateau for hundreds of steps. So the
layers above the bottleneck may run at `ctc_upsample` frames per token (each token repeated,
plus a learned phase embedding); the tokens themselves stay at 12.5 Hz.

Parameter names follow Hugging Face's `WhisperEncoder` (`conv1`, `conv2`, `layers.i.self_attn.
{q,k,v,out}_proj` (k without bias), `self_attn_layer_norm`, `fc1`, `fc2`, `final_layer_norm`,
`layer_norm`), with layers split at the quantizer as in GLM-4-Voice's tokenizer (16 + 16 of
whisper-large-v3), so Whisper-family weights map on by transposing kernels.

Legend: B batch, F mel frames (100 Hz), M mel bins, T encoder frames (50 Hz), N tokens
(12.5 Hz), L a layer stack's length (T or N), D model, H heads, Dh head dim, E ffn, U units.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sptlm import sharding
from sptlm.model import attention, nnx_compat, rotary
from sptlm.speech import moonshine, speech_embedding
from sptlm.speech.config import EncoderConfig
from sptlm.speech.vq import VectorQuantizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FRAMES_PER_TOKEN = 8  # 100 Hz mel frames per 12.5 Hz token (stride 2, then pool 4)
ROPE_THETA = 10_000.0


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> np.ndarray:
  """Whisper's fixed positional embedding [length, channels]."""
  inc = math.log(max_timescale) / (channels // 2 - 1)
  inv = np.exp(-inc * np.arange(channels // 2))
  t = np.arange(length)[:, None] * inv[None, :]
  return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def _param(rngs: nnx.Rngs, init, shape, names, dtype):
  return nnx.Param(nnx_compat.init(init, names)(rngs.params(), shape, dtype))


class Linear(nnx.Module):
  """x @ kernel (+ bias); the kernel may have several output axes ([D, H, Dh] for q)."""

  def __init__(self, in_dim: int, out_shape: tuple[int, ...], names: tuple[str | None, ...],
               cfg: EncoderConfig, *, bias: bool, rngs: nnx.Rngs, in_axes: int = 1):
    pdt = DTYPES[cfg.param_dtype]
    std = cfg.init_std
    shape = (*((in_dim,) if in_axes == 1 else in_dim), *out_shape)
    self.in_axes = in_axes
    self.kernel = _param(rngs, jax.nn.initializers.normal(std), shape, names, pdt)
    if bias:
      self.bias = _param(rngs, jax.nn.initializers.zeros, out_shape, names[in_axes:], pdt)
    else:
      self.bias = None

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel.value.astype(x.dtype)
    y = jnp.tensordot(x, k, axes=self.in_axes)
    if self.bias is not None:
      y = y + self.bias.value.astype(x.dtype)
    return y


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    pdt = DTYPES[cfg.param_dtype]
    self.scale = _param(rngs, jax.nn.initializers.ones, (dim,), ("act_embed",), pdt)
    self.bias = _param(rngs, jax.nn.initializers.zeros, (dim,), ("act_embed",), pdt)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5)
    return (y * self.scale.value + self.bias.value).astype(x.dtype)


class Conv1d(nnx.Module):
  """Whisper's stem convolution: kernel 3, 'same' padding (or only past frames, if causal)."""

  def __init__(self, in_dim: int, out_dim: int, stride: int, cfg: EncoderConfig, *,
               rngs: nnx.Rngs):
    pdt = DTYPES[cfg.param_dtype]
    std = 1.0 / math.sqrt(3 * in_dim)
    self.kernel = _param(rngs, jax.nn.initializers.normal(std), (3, in_dim, out_dim),
                         (None, None, "embed"), pdt)
    self.bias = _param(rngs, jax.nn.initializers.zeros, (out_dim,), ("act_embed",), pdt)
    self.stride = stride
    self.causal = cfg.causal_stem

  def __call__(self, x_BxLxC: jax.Array) -> jax.Array:
    pad = (2, 0) if self.causal else (1, 1)
    if self.causal and self.stride == 2:
      pad = (1, 0)  # frame t of the output sees input frames 2t-1, 2t, 2t+1: the past and now
    y = jax.lax.conv_general_dilated(
        x_BxLxC, self.kernel.value.astype(x_BxLxC.dtype), (self.stride,), [pad],
        dimension_numbers=("NWC", "WIO", "NWC"))
    return y + self.bias.value.astype(y.dtype)


class SelfAttention(nnx.Module):
  """Whisper's attention; with `rope`, queries and keys are rotated by their frame (rotary
  positions, no parameters), so attention sees only relative positions."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, rope: bool = False):
    self.rope = rope
    d, h = cfg.d_model, cfg.num_heads
    dh = d // h
    qkv = ("embed", "heads", "head_dim")
    self.q_proj = Linear(d, (h, dh), qkv, cfg, bias=True, rngs=rngs)
    self.k_proj = Linear(d, (h, dh), qkv, cfg, bias=False, rngs=rngs)  # Whisper: no k bias
    self.v_proj = Linear(d, (h, dh), qkv, cfg, bias=True, rngs=rngs)
    self.out_proj = Linear((h, dh), (d,), ("heads", "head_dim", "embed"), cfg, bias=True,
                           rngs=rngs, in_axes=2)

  def __call__(self, x_BxLxD: jax.Array, mask_BxLxL: jax.Array) -> jax.Array:
    q_BxLxHxDh = sharding.constrain(self.q_proj(x_BxLxD), ("batch", "length", "heads",
                                                           "head_dim"))
    k_BxLxHxDh = self.k_proj(x_BxLxD)
    if self.rope:
      pos_BxL = jnp.broadcast_to(jnp.arange(x_BxLxD.shape[1]), x_BxLxD.shape[:2])
      q_BxLxHxDh, k_BxLxHxDh = (rotary.apply_rotary(t, pos_BxL, theta=ROPE_THETA, fraction=1.0,
                                                    style="rotate_half")
                                for t in (q_BxLxHxDh, k_BxLxHxDh))
    out = attention.masked_attention(q_BxLxHxDh, k_BxLxHxDh, self.v_proj(x_BxLxD), mask_BxLxL)
    return self.out_proj(out)


class ConvModule(nnx.Module):
  """Conformer's convolution module (Gulati et al. 2020), optional (model.conv_kernel): LN ->
  pointwise to 2D -> GLU -> depthwise conv over time -> LN -> swish -> pointwise. Local
  patterns (formant transitions, short phones) that attention learns only slowly."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    d, k = cfg.d_model, cfg.conv_kernel
    pdt = DTYPES[cfg.param_dtype]
    self.layer_norm = LayerNorm(d, cfg, rngs=rngs)
    self.pointwise_in = Linear(d, (2 * d,), ("embed", "mlp"), cfg, bias=True, rngs=rngs)
    self.depthwise = _param(rngs, jax.nn.initializers.normal(1.0 / math.sqrt(k)), (k, 1, d),
                            (None, None, "act_embed"), pdt)
    self.depthwise_bias = _param(rngs, jax.nn.initializers.zeros, (d,), ("act_embed",), pdt)
    self.conv_layer_norm = LayerNorm(d, cfg, rngs=rngs)
    self.pointwise_out = Linear(d, (d,), ("mlp", "embed"), cfg, bias=True, rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array, valid_BxL: jax.Array) -> jax.Array:
    a, gate = jnp.split(self.pointwise_in(self.layer_norm(x_BxLxD)), 2, axis=-1)
    h = a * jax.nn.sigmoid(gate) * valid_BxL[..., None].astype(a.dtype)  # padding stays zero
    # depthwise "same" convolution as k shifted multiply-adds: XLA's grouped convolution is
    # many times slower on CPU
    w_KxD = self.depthwise.value[:, 0].astype(h.dtype)
    k, length = w_KxD.shape[0], h.shape[1]
    padded = jnp.pad(h, ((0, 0), (k // 2, k // 2), (0, 0)))
    h = sum(padded[:, j:j + length] * w_KxD[j] for j in range(k))
    h = jax.nn.silu(self.conv_layer_norm(h + self.depthwise_bias.value.astype(h.dtype)))
    return self.pointwise_out(h)


class Dropout(NamedTuple):
  """Training-time dropout of the layers above the bottleneck (asr.dropout): its rate and key."""
  rate: float
  key: jax.Array


def dropout(x: jax.Array, drop: Dropout | None, key: jax.Array | None) -> jax.Array:
  """Inverted dropout of `x` with `key` (the identity when `drop` is None)."""
  if drop is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - drop.rate, x.shape)
  return jnp.where(keep, x / (1.0 - drop.rate), 0).astype(x.dtype)


class EncoderLayer(nnx.Module):
  """Whisper's pre-LN encoder layer: x + attn(LN(x)), then x + fc2(GELU(fc1(LN(x)))); with
  model.conv_kernel, a Conformer convolution module between the two."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, rope: bool = False):
    d, e = cfg.d_model, cfg.d_ff
    self.self_attn_layer_norm = LayerNorm(d, cfg, rngs=rngs)
    self.self_attn = SelfAttention(cfg, rngs=rngs, rope=rope)
    self.conv = ConvModule(cfg, rngs=rngs) if cfg.conv_kernel else None
    self.final_layer_norm = LayerNorm(d, cfg, rngs=rngs)
    self.fc1 = Linear(d, (e,), ("embed", "mlp"), cfg, bias=True, rngs=rngs)
    self.fc2 = Linear(e, (d,), ("mlp", "embed"), cfg, bias=True, rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array, mask_BxLxL: jax.Array,
               drop: Dropout | None = None) -> jax.Array:
    keys = jax.random.split(drop.key, 3) if drop else (None,) * 3
    x_BxLxD = x_BxLxD + dropout(
        self.self_attn(self.self_attn_layer_norm(x_BxLxD), mask_BxLxL), drop, keys[0])
    if self.conv is not None:  # a real frame's mask row sees itself: the diagonal is `valid`
      x_BxLxD = x_BxLxD + dropout(
          self.conv(x_BxLxD, jnp.diagonal(mask_BxLxL, axis1=1, axis2=2)), drop, keys[1])
    h_BxLxE = jax.nn.gelu(self.fc1(self.final_layer_norm(x_BxLxD)), approximate=False)
    h_BxLxE = sharding.constrain(h_BxLxE, ("batch", "length", "mlp"))
    x_BxLxD = x_BxLxD + dropout(self.fc2(h_BxLxE), drop, keys[2])
    return sharding.constrain(x_BxLxD, ("batch", "length", "act_embed"))


class Layers(nnx.Module):
  """A stack of encoder layers with parameters on a leading `layers` axis, run by scan."""

  def __init__(self, cfg: EncoderConfig, num: int, *, rngs: nnx.Rngs, rope: bool = False):
    self.num = num
    if num:
      self.stack = nnx_compat.stacked(lambda r: EncoderLayer(cfg, rngs=r, rope=rope), num, rngs)

  def __call__(self, x_BxLxD: jax.Array, mask_BxLxL: jax.Array,
               drop: Dropout | None = None) -> jax.Array:
    if not self.num:
      return x_BxLxD
    graphdef, state = nnx.split(self.stack)
    keys = jax.random.split(drop.key, self.num) if drop else None

    def layer(x, xs):
      layer_state, key = xs
      layer_drop = drop._replace(key=key) if drop else None
      return nnx.merge(graphdef, layer_state)(x, mask_BxLxL, layer_drop), None

    x_BxLxD, _ = jax.lax.scan(layer, x_BxLxD, (state, keys))
    return x_BxLxD


def _embedding_layer(cfg: EncoderConfig) -> str:
  """Which layer of speech_embedding the frontend reads ("" for Whisper's mel stem)."""
  return {"speech_embedding": "embedding", "speech_embedding_pool4": "pool4"}.get(
      cfg.frontend, "")


def receptive_seconds(cfg: EncoderConfig) -> float:
  """How far beyond its own 80 ms a token's code can depend on audio, each way (inf with full
  attention): the windowed layers, the conv stem (30 ms) and, to be safe, one more token."""
  if not cfg.attention_window_seconds and cfg.layers_before_vq:
    return float("inf")
  conv = 0.02 * (cfg.conv_kernel // 2)  # each layer's depthwise convolution reaches this far
  stem = (moonshine.RECEPTIVE_SECONDS if cfg.frontend.startswith("moonshine_tiny") else
          speech_embedding.RECEPTIVE_SECONDS if _embedding_layer(cfg) else 0.03)
  return (cfg.layers_before_vq * (cfg.attention_window_seconds + conv) + stem + 0.02 * cfg.pool
          + cfg.mel_norm_seconds / 2)


def normalize_mel(mel_BxFxM: jax.Array, valid_BxF: jax.Array, half: int) -> jax.Array:
  """Each bin minus its mean over the real frames within `half` frames either way; padding
  frames become 0. Prefix sums make it O(F) for any window; their float32 rounding is divided
  by the frame count, so windows and whole files agree to about 1e-6."""
  x = mel_BxFxM.astype(jnp.float32)
  w = valid_BxF.astype(jnp.float32)[..., None]
  sums = jnp.pad(jnp.cumsum(x * w, axis=1), ((0, 0), (1, 0), (0, 0)))
  counts = jnp.pad(jnp.cumsum(w, axis=1), ((0, 0), (1, 0), (0, 0)))
  f = x.shape[1]
  lo = jnp.clip(jnp.arange(f) - half, 0, f)
  hi = jnp.clip(jnp.arange(f) + half + 1, 0, f)
  mean = (sums[:, hi] - sums[:, lo]) / jnp.maximum(counts[:, hi] - counts[:, lo], 1.0)
  return ((x - mean) * w).astype(mel_BxFxM.dtype)


def attention_mask(valid_BxL: jax.Array, block: int, window: int = 0) -> jax.Array:
  """Keys must be real frames; with block > 0, also in the query's block or an earlier one;
  with window > 0, at most `window` frames before or after the query."""
  mask = jnp.broadcast_to(valid_BxL[:, None, :], (*valid_BxL.shape, valid_BxL.shape[1]))
  pos = jnp.arange(valid_BxL.shape[1])
  if block:
    idx = pos // block
    mask = mask & (idx[None, :, None] >= idx[None, None, :])
  if window:
    mask = mask & (jnp.abs(pos[:, None] - pos[None, :]) <= window)[None]
  return mask


class Encoded(NamedTuple):
  h_BxNxD: jax.Array  # pooled encoder output: what the quantizer sees
  valid_BxN: jax.Array  # bool: the token is inside the audio
  frames_BxTxD: jax.Array  # the 50 Hz encoder output before pooling (intermediate CTC reads it)


class SpeechTokenizerModel(nnx.Module):
  def __init__(self, cfg: EncoderConfig, codebook_size: int, units: int, *, rngs: nnx.Rngs,
               inter_ctc: bool = False, code_dim: int = 0, normalize_codes: bool = False,
               engine_classes: int = 0):
    self.cfg = cfg
    d = cfg.d_model
    if _embedding_layer(cfg):  # frozen CNN (no parameters here) -> LN -> phases
      dim = speech_embedding.DIMS[_embedding_layer(cfg)]
      self.conv1 = self.conv2 = None
      self.embed_layer_norm = LayerNorm(dim, cfg, rngs=rngs)
      self.embed_proj = Linear(dim, (cfg.pool, d), (None, None, "embed"), cfg, bias=True,
                               rngs=rngs)
    elif cfg.frontend.startswith("moonshine_tiny"):  # frozen encoder's features -> LN -> linear
      self.embed_layer_norm = LayerNorm(moonshine.DIM, cfg, rngs=rngs)
      self.embed_proj = Linear(moonshine.DIM, (d,), (None, "embed"), cfg, bias=True, rngs=rngs)
      if cfg.frontend == "moonshine_tiny_mel":  # + the log-mel's own conv stem, summed
        self.conv1 = Conv1d(cfg.num_mels - moonshine.DIM, d, 1, cfg, rngs=rngs)
        self.conv2 = Conv1d(d, d, 2, cfg, rngs=rngs)
      else:
        self.conv1 = self.conv2 = None
    else:
      self.conv1 = Conv1d(cfg.num_mels, d, 1, cfg, rngs=rngs)
      self.conv2 = Conv1d(d, d, 2, cfg, rngs=rngs)
      self.embed_layer_norm = self.embed_proj = None
    self.layers_before_vq = Layers(cfg, cfg.layers_before_vq, rngs=rngs,
                                   rope=cfg.positions == "rope")
    if code_dim:  # factorized codes: LN -> down to code_dim -> VQ -> back up to d_model
      self.vq_layer_norm = LayerNorm(d, cfg, rngs=rngs)
      self.vq_in = Linear(d, (code_dim,), ("embed", None), cfg, bias=True, rngs=rngs)
      self.vq_out = Linear(code_dim, (d,), (None, "embed"), cfg, bias=True, rngs=rngs)
    else:
      self.vq_layer_norm = self.vq_in = self.vq_out = None
    self.vq = VectorQuantizer(codebook_size, code_dim or d, rngs=rngs, normalize=normalize_codes)
    self.token_rate_layers = Layers(cfg, cfg.token_rate_layers, rngs=rngs)
    if cfg.token_rate_layers and cfg.ctc_upsample > 1:  # each token's frames: own linear maps
      self.upsample_proj = Linear(d, (cfg.ctc_upsample, d), ("embed", None, "act_embed"), cfg,
                                  bias=False, rngs=rngs)
    else:
      self.upsample_proj = None
    if cfg.ctc_upsample > 1:
      self.upsample_phase = _param(rngs, jax.nn.initializers.normal(cfg.init_std),
                                   (cfg.ctc_upsample, d), (None, "act_embed"),
                                   DTYPES[cfg.param_dtype])
    self.layers_after_vq = Layers(cfg, cfg.layers_after_vq - cfg.token_rate_layers, rngs=rngs)
    self.layer_norm = LayerNorm(d, cfg, rngs=rngs)
    self.ctc_head = Linear(d, (units + 1,), ("embed", "vocab"), cfg, bias=True, rngs=rngs)
    if inter_ctc:  # training-only head below the bottleneck (not part of Whisper's layout)
      self.inter_layer_norm = LayerNorm(d, cfg, rngs=rngs)
      self.inter_ctc_head = Linear(d, (units + 1,), ("embed", "vocab"), cfg, bias=True,
                                   rngs=rngs)
    else:
      self.inter_layer_norm = self.inter_ctc_head = None
    if engine_classes:  # training-only engine adversary on what the quantizer sees
      self.engine_hidden = Linear(d, (d,), ("embed", "mlp"), cfg, bias=True, rngs=rngs)
      self.engine_head = Linear(d, (engine_classes,), ("mlp", None), cfg, bias=True, rngs=rngs)
    else:
      self.engine_hidden = self.engine_head = None

  @property
  def receptive_seconds(self) -> float:
    return receptive_seconds(self.cfg)

  @property
  def block_tokens(self) -> int:
    return round(self.cfg.block_causal_seconds * 12.5 * 4 / self.cfg.pool)

  def encode(self, mel_BxFxM: jax.Array, valid_BxN: jax.Array,
             mel_keep_B: jax.Array | None = None) -> Encoded:
    """Features -> pooled, unquantized encoder output at 12.5 Hz. F = 8 N. `mel_keep_B`
    (a hybrid in training, model.mel_stem_dropout): false leaves that utterance's log-mel stem
    out of the sum."""
    cfg = self.cfg
    dt = DTYPES[cfg.dtype]
    b, n = valid_BxN.shape
    hybrid = cfg.frontend == "moonshine_tiny_mel"
    if hybrid:  # [B, 8N, 288 + 128]: Moonshine's features, then the log-mel
      mel_BxFxM, logmel_BxFxM = mel_BxFxM[..., :moonshine.DIM], mel_BxFxM[..., moonshine.DIM:]
    if cfg.mel_norm_seconds:  # the log-mel's bins only (a hybrid's Moonshine part is left)
      half = round(cfg.mel_norm_seconds * 50)  # 100 Hz frames each way
      valid_BxF = jnp.repeat(valid_BxN, FRAMES_PER_TOKEN, axis=1)
      if hybrid:
        logmel_BxFxM = normalize_mel(logmel_BxFxM, valid_BxF, half)
      else:
        mel_BxFxM = normalize_mel(mel_BxFxM, valid_BxF, half)
    if cfg.frontend.startswith("moonshine_tiny"):  # [B, 8N, 288] at 100 Hz -> [B, 4N, D] 50 Hz
      f_BxTx2xE = mel_BxFxM.reshape(b, -1, 2, moonshine.DIM).astype(jnp.float32)
      x_BxTxD = self.embed_proj(self.embed_layer_norm(f_BxTx2xE.mean(axis=2).astype(dt)))
      if hybrid:
        x = jax.nn.gelu(self.conv1(logmel_BxFxM.astype(dt)), approximate=False)
        stem_BxTxD = jax.nn.gelu(self.conv2(x), approximate=False)
        if mel_keep_B is not None:
          stem_BxTxD = jnp.where(mel_keep_B[:, None, None], stem_BxTxD, 0)
        x_BxTxD = x_BxTxD + stem_BxTxD
    elif self.embed_proj is not None:  # [B, N, 96] -> [B, N, pool, D] -> [B, 4N, D]
      valid_BxF = jnp.repeat(valid_BxN, FRAMES_PER_TOKEN, axis=1)
      e_BxNxE = jax.lax.stop_gradient(
          speech_embedding.embed(mel_BxFxM, valid_BxF, _embedding_layer(cfg)))
      x_BxTxD = self.embed_proj(self.embed_layer_norm(e_BxNxE.astype(dt)))
      x_BxTxD = x_BxTxD.reshape(b, n * cfg.pool, cfg.d_model)
    else:
      x = jax.nn.gelu(self.conv1(mel_BxFxM.astype(dt)), approximate=False)
      x_BxTxD = jax.nn.gelu(self.conv2(x), approximate=False)
    t = x_BxTxD.shape[1]
    if cfg.positions == "sinusoid":  # Whisper's; with "rope" the attention rotates q and k
      x_BxTxD = x_BxTxD + jnp.asarray(sinusoids(t, cfg.d_model), dt)
    x_BxTxD = sharding.constrain(x_BxTxD, ("batch", "length", "act_embed"))
    per_token = cfg.pool
    valid_BxT = jnp.repeat(valid_BxN, per_token, axis=1)
    mask = attention_mask(valid_BxT, self.block_tokens * per_token,
                          round(cfg.attention_window_seconds * 50))
    x_BxTxD = self.layers_before_vq(x_BxTxD, mask)
    h_BxNxD = x_BxTxD.reshape(b, n, per_token, cfg.d_model).mean(axis=2)
    return Encoded(h_BxNxD, valid_BxN, x_BxTxD)

  def to_code_space(self, h_BxNxD: jax.Array) -> jax.Array:
    """Pooled encoder output -> what the quantizer compares with its codes."""
    if self.vq_in is None:
      return h_BxNxD
    return self.vq_in(self.vq_layer_norm(h_BxNxD))

  def from_code_space(self, q_BxNxC: jax.Array) -> jax.Array:
    """(Quantized) code vectors -> the model width, for the layers above the bottleneck."""
    return q_BxNxC if self.vq_out is None else self.vq_out(q_BxNxC)

  def tokenize(self, mel_BxFxM: jax.Array, valid_BxN: jax.Array) -> jax.Array:
    """Features -> codes [B, N] (padding positions hold arbitrary codes)."""
    return self.vq.nearest(self.to_code_space(self.encode(mel_BxFxM, valid_BxN).h_BxNxD))

  def ctc_logits(self, q_BxNxD: jax.Array, valid_BxN: jax.Array,
                 drop: Dropout | None = None) -> jax.Array:
    """Quantized vectors -> CTC logits [B, N * up, U + 1] (float32); blank is 0. `drop`
    (training only): dropout on the code vectors and in every layer's residual branches."""
    cfg = self.cfg
    dt = DTYPES[cfg.dtype]
    up = cfg.ctc_upsample
    b, n, d = q_BxNxD.shape
    keys = jax.random.split(drop.key, 3) if drop else (None,) * 3
    x = dropout(q_BxNxD.astype(dt), drop, keys[0])
    if cfg.token_rate_layers:  # the first layers above the VQ at 12.5 Hz: a quarter the cost
      x = x + jnp.asarray(sinusoids(n, d), dt)
      x = self.token_rate_layers(x, attention_mask(valid_BxN, self.block_tokens),
                                 drop._replace(key=keys[1]) if drop else None)
    if up > 1:  # [B, N, D] -> [B, N * up, D]: each token once per CTC frame, phase-marked
      x_BxNxUxD = x[:, :, None, :] + self.upsample_phase.value.astype(dt)
      if self.upsample_proj is not None:
        x_BxNxUxD = x_BxNxUxD + self.upsample_proj(x)
      x = x_BxNxUxD.reshape(b, n * up, d)
    if not cfg.token_rate_layers:
      x = x + jnp.asarray(sinusoids(n * up, d), dt)
    mask = attention_mask(jnp.repeat(valid_BxN, up, axis=1), self.block_tokens * up)
    x = self.layers_after_vq(x, mask, drop._replace(key=keys[2]) if drop else None)
    return self.ctc_head(self.layer_norm(x)).astype(jnp.float32)

  def inter_ctc_logits(self, frames_BxTxD: jax.Array) -> jax.Array:
    """Intermediate CTC: logits [B, T, U + 1] straight from the 50 Hz frames below the pooling.

    A direct, well-aligned gradient into the layers that make the tokens (Lee & Watanabe 2021's
    intermediate CTC): they learn to separate sounds from the first steps instead of through the
    quantizer's straight-through estimate alone, so the codebook clusters useful features early.
    """
    x = self.inter_layer_norm(frames_BxTxD)
    return self.inter_ctc_head(x).astype(jnp.float32)

  def engine_logits(self, h_BxNxD: jax.Array, *, frozen: bool = False) -> jax.Array:
    """Which TTS engine said each token, guessed from the pooled encoder output: [B, N, E].
    `frozen`: no gradient reaches the head's own weights (the encoder's confusion loss)."""
    hold = jax.lax.stop_gradient if frozen else (lambda v: v)

    def linear(m: Linear, x: jax.Array) -> jax.Array:
      return (jnp.tensordot(x, hold(m.kernel.value).astype(x.dtype), axes=1)
              + hold(m.bias.value).astype(x.dtype))

    x = jax.nn.gelu(linear(self.engine_hidden, h_BxNxD), approximate=False)
    return linear(self.engine_head, x).astype(jnp.float32)

  def logits_from_codes(self, codes_BxN: jax.Array, valid_BxN: jax.Array) -> jax.Array:
    """`transcribe --tokens`: stored codes -> CTC logits, without any audio."""
    return self.ctc_logits(self.from_code_space(self.vq.lookup(codes_BxN)), valid_BxN)


def build(cfg: EncoderConfig, codebook_size: int, units: int, seed: int, *,
          inter_ctc: bool = False, code_dim: int = 0, normalize_codes: bool = False,
          engine_classes: int = 0) -> SpeechTokenizerModel:
  return SpeechTokenizerModel(cfg, codebook_size, units, rngs=nnx.Rngs(params=seed),
                              inter_ctc=inter_ctc, code_dim=code_dim,
                              normalize_codes=normalize_codes, engine_classes=engine_classes)
