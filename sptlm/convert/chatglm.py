"""The original ChatGLM checkpoint layout (THUDM/glm-4-9b, glm-4-voice-9b) as sptlm's GLM family.

These folders carry custom modeling code (`modeling_chatglm.py`, model_type "chatglm") that
computes GLM-4's math under other names, with fused tensors (N layers, H heads, K kv groups,
Dh = kv_channels, F = ffn_hidden_size, V = padded_vocab_size):

  transformer.embedding.word_embeddings.weight     [V, D]           embed
  transformer.encoder.layers.i.
    input_layernorm.weight                         [D]              attn_norm
    self_attention.query_key_value.weight          [(H+2K)Dh, D]    q, k, v
    self_attention.query_key_value.bias            [(H+2K)Dh]       q/k/v biases (add_qkv_bias)
    self_attention.dense.weight                    [D, H Dh]        o
    post_attention_layernorm.weight                [D]              mlp_norm
    mlp.dense_h_to_4h.weight                       [2F, D]          gate (rows :F), up (rows F:)
    mlp.dense_4h_to_h.weight                       [D, F]           down
  transformer.encoder.final_layernorm.weight       [D]              final_norm
  transformer.output_layer.weight                  [V, D]           lm_head (never tied: the
                                                                    reference model always
                                                                    has its own output layer)
  transformer.rotary_pos_emb.inv_freq              recomputed buffer, not a parameter

With multi_query_attention the fused rows are all query heads, then the K key groups, then
the K value groups; without it (K = H) they go head by head, q k v per head, as the reference
views them as [H, 3 Dh]. The MLP is silu(first half) * second half of dense_h_to_4h (its
swiglu), the same order as transformers' GLM gate_up_proj. Rotary: the reference builds its
table for kv_channels / 2 dims at base 10000 * rope_ratio and rotates pairs (2i, 2i + 1) of
those first dims of each head: sptlm's rope_style "interleaved", rope_fraction 0.5,
rope_theta 10000 * rope_ratio. Scores are scaled by kv_channels^-0.5 (the query-key layer
scaling multiplies and divides by the layer number). So the import is the GLM family, and
`to-hf` exports it as GlmForCausalLM.
"""

import dataclasses
import json
import logging
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from sptlm.config import ModelConfig
from sptlm.convert import ConversionError
from sptlm.convert.layout import EMBED, LM_HEAD, Get, Group, Read

log = logging.getLogger(__name__)

MODEL_TYPE = "chatglm"
ROPE_BASE = 10_000.0  # the reference's fixed base, multiplied by rope_ratio

# config.json keys the import needs (their reference defaults are another model's sizes).
_REQUIRED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
             "padded_vocab_size")
# The reference ChatGLMConfig's defaults, used when a config.json leaves a key out.
_DEFAULTS: dict[str, Any] = {
    "kv_channels": 128, "layernorm_epsilon": 1e-5, "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
    "add_bias_linear": False, "add_qkv_bias": False, "multi_query_attention": False,
    "multi_query_group_num": 1, "rope_ratio": 1, "original_rope": True,
    "quantization_bit": 0, "pre_seq_len": None,
}
# Keys that change nothing sptlm computes: dropout, numerics of the reference's own kernels,
# the context length it was trained at, token ids, bookkeeping.
_NO_MATH = frozenset({
    "hidden_dropout", "attention_dropout", "classifier_dropout", "bias_dropout_fusion",
    "apply_query_key_layer_scaling", "attention_softmax_in_fp32", "fp32_residual_connection",
    "prefix_projection", "seq_length", "use_cache", "torch_dtype", "dtype",
    "transformers_version", "_name_or_path", "model_type", "architectures", "auto_map",
    "eos_token_id", "pad_token_id", "bos_token_id", "boi_token_id", "eoi_token_id",
    "tie_word_embeddings", "vocab_size", "num_hidden_layers",
})


def is_chatglm(raw: dict[str, Any]) -> bool:
  """Whether a config.json describes the ChatGLM layout (model_type or architectures)."""
  archs = raw.get("architectures") or []
  return raw.get("model_type") == MODEL_TYPE or any(
      str(a).startswith("ChatGLM") for a in archs)


@dataclasses.dataclass(frozen=True)
class Source:
  """What the tensor layout needs beyond sptlm's ModelConfig."""

  multi_query: bool  # fused rows q | k | v (True) or q k v head by head (False)


def _value(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], file: str) -> Any:
  value = raw[key] if key in raw else _DEFAULTS[key]
  ok = isinstance(value, kind) and not (kind in (int, float, (int, float))
                                        and isinstance(value, bool))
  if not ok:
    what = {bool: "true or false", int: "an integer"}.get(kind, "a number")
    raise ConversionError(f"{file} {key}={value!r}: sptlm needs {what}")
  return value


def model_fields(raw: dict[str, Any], file: str) -> tuple[dict[str, Any], int, Source]:
  """(ModelConfig arch fields, text vocabulary rows, tensor layout) of a ChatGLM config.json.

  Anything the reference would compute differently from sptlm's block is refused in one line
  that names the key.
  """
  for key in _REQUIRED:
    if key not in raw:
      raise ConversionError(f"{file} has no {key}: not a complete ChatGLM config")
  ints = {k: _value(raw, k, int, file) for k in (*_REQUIRED, "kv_channels",
                                                "multi_query_group_num")}
  for key, value in ints.items():
    if value < 1:
      raise ConversionError(f"{file} {key}={value}: must be positive")
  # original_rope is only type-checked: the reference stores it and its rotary never reads it.
  flags = {k: _value(raw, k, bool, file) for k in (
      "rmsnorm", "apply_residual_connection_post_layernorm", "post_layer_norm",
      "add_bias_linear", "add_qkv_bias", "multi_query_attention", "original_rope")}

  def need(key: str, ok: bool, what: str) -> None:
    if not ok:
      value = raw.get(key, _DEFAULTS.get(key))
      raise ConversionError(f"{file} {key}={value!r}: sptlm needs {what}")

  need("rmsnorm", flags["rmsnorm"], "true (its blocks use RMSNorm, not LayerNorm)")
  need("apply_residual_connection_post_layernorm",
       not flags["apply_residual_connection_post_layernorm"],
       "false (its residual is the block input, not the normed input)")
  need("post_layer_norm", flags["post_layer_norm"], "true (a final norm before the output)")
  need("add_bias_linear", not flags["add_bias_linear"],
       "false (no biases on the output projection and the MLP)")
  quant = raw.get("quantization_bit", _DEFAULTS["quantization_bit"])
  need("quantization_bit", quant in (0, None), "0 (import the unquantized release)")
  need("pre_seq_len", raw.get("pre_seq_len") is None, "null (no P-tuning prefix encoder)")
  for key in ("rope_scaling", "rope_parameters"):
    need(key, not raw.get(key), "no rotary scaling (sptlm has the plain rotary only)")
  for alias, key in (("num_hidden_layers", "num_layers"), ("vocab_size", "padded_vocab_size")):
    if alias in raw and raw[alias] != ints[key]:
      raise ConversionError(f"{file} {alias}={raw[alias]!r} and {key}={ints[key]} disagree")
  ratio = _value(raw, "rope_ratio", (int, float), file)
  need("rope_ratio", ratio > 0, "a positive number")
  eps = _value(raw, "layernorm_epsilon", (int, float), file)
  need("layernorm_epsilon", eps > 0, "a positive number")
  heads, dh = ints["num_attention_heads"], ints["kv_channels"]
  need("kv_channels", dh % 4 == 0,
       "a multiple of 4 (the reference rotates kv_channels / 2 dims in pairs)")
  groups = ints["multi_query_group_num"] if flags["multi_query_attention"] else heads
  if heads % groups:
    raise ConversionError(f"{file} multi_query_group_num={groups} must divide "
                          f"num_attention_heads={heads}")
  unknown = sorted(set(raw) - set(_REQUIRED) - set(_DEFAULTS) - _NO_MATH)
  if unknown:
    log.warning("%s: ignoring keys sptlm does not know: %s", file, ", ".join(unknown))
  fields = dict(
      num_layers=ints["num_layers"], d_model=ints["hidden_size"], num_heads=heads,
      num_kv_heads=groups, head_dim=dh, d_ff=ints["ffn_hidden_size"],
      rope_theta=ROPE_BASE * float(ratio), rope_fraction=0.5, rope_style="interleaved",
      qkv_bias=flags["add_qkv_bias"], tie_embeddings=False, norm_eps=float(eps))
  return fields, ints["padded_vocab_size"], Source(flags["multi_query_attention"])


def read_config(hf_dir: pathlib.Path) -> dict[str, Any] | None:
  """config.json as a dict when it is the ChatGLM layout, else None (transformers reads it)."""
  path = hf_dir / "config.json"
  try:
    raw = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: not readable JSON ({str(e).splitlines()[0][:160]})") from None
  if not isinstance(raw, dict):
    raise ConversionError(f"{path}: not a JSON object")
  return raw if is_chatglm(raw) else None


def glm_config_base(raw: dict[str, Any]) -> dict[str, Any]:
  """The keys of a ChatGLM config.json that a transformers GlmConfig keeps (token ids, length)."""
  out = {k: raw[k] for k in ("eos_token_id", "pad_token_id", "bos_token_id") if k in raw}
  if isinstance(raw.get("seq_length"), int):
    out["max_position_embeddings"] = raw["seq_length"]
  return out


# ---------------------------------------------------------------------------------------------
# Tensors

def _name(i: int, suffix: str) -> str:
  return f"transformer.encoder.layers.{i}.{suffix}"


def _shaped(read: Read, name: str, shape: tuple[int, ...]) -> np.ndarray:
  a = read(name)
  if a.shape != shape:
    raise ConversionError(f"tensor {name!r} has shape {list(a.shape)} but the config.json "
                          f"makes it {list(shape)}")
  return a


def _per_layer(leaves: tuple[tuple[str, ...], ...], suffix: str, n: int, shape: tuple[int, ...],
               split: Callable[[np.ndarray], tuple[np.ndarray, ...]],
               join: Callable[..., np.ndarray]) -> Group:
  """Stacked sptlm leaves whose layer i is one (possibly fused) ChatGLM tensor."""
  names = tuple(_name(i, suffix) for i in range(n))

  def export(get: Get) -> Iterator[tuple[str, np.ndarray]]:
    for i in range(n):
      yield names[i], join(*(get(leaf, i) for leaf in leaves))

  def load(read: Read, out: list[np.ndarray]) -> None:
    for i in range(n):
      for target, part in zip(out, split(_shaped(read, names[i], shape))):
        target[i] = part

  return Group(leaves, names, export, load)


def _whole(leaf: tuple[str, ...], name: str, shape: tuple[int, ...],
           to_hf: Callable[[np.ndarray], np.ndarray],
           from_hf: Callable[[np.ndarray], np.ndarray]) -> Group:
  def export(get: Get) -> Iterator[tuple[str, np.ndarray]]:
    yield name, to_hf(get(leaf, None))

  def load(read: Read, out: list[np.ndarray]) -> None:
    out[0][...] = from_hf(_shaped(read, name, shape))

  return Group((leaf,), (name,), export, load)


def groups(m: ModelConfig, src: Source, text_size: int) -> list[Group]:
  """Every sptlm parameter <-> its ChatGLM tensor(s); `text_size` rows of the vocabulary."""
  n, d, h, k, dh, f = m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff
  q_rows, kv_rows = h * dh, k * dh
  attn, mlp = ("layers", "attn"), ("layers", "mlp")
  same = lambda a: a  # noqa: E731

  def split_weight(w: np.ndarray) -> tuple[np.ndarray, ...]:
    # [rows, D] -> q [D, H, Dh], k and v [D, K, Dh]
    if src.multi_query:
      parts = (w[:q_rows], w[q_rows:q_rows + kv_rows], w[q_rows + kv_rows:])
      return tuple(p.T.reshape(d, p.shape[0] // dh, dh) for p in parts)
    per_head = w.reshape(h, 3, dh, d)
    return tuple(np.transpose(per_head[:, j], (2, 0, 1)) for j in range(3))

  def join_weight(q: np.ndarray, kk: np.ndarray, v: np.ndarray) -> np.ndarray:
    if src.multi_query:
      return np.concatenate([a.reshape(d, -1).T for a in (q, kk, v)], axis=0)
    return np.stack([np.transpose(a, (1, 2, 0)) for a in (q, kk, v)], axis=1).reshape(-1, d)

  def split_bias(b: np.ndarray) -> tuple[np.ndarray, ...]:
    if src.multi_query:
      return (b[:q_rows].reshape(h, dh), b[q_rows:q_rows + kv_rows].reshape(k, dh),
              b[q_rows + kv_rows:].reshape(k, dh))
    per_head = b.reshape(h, 3, dh)
    return tuple(per_head[:, j] for j in range(3))

  def join_bias(q: np.ndarray, kk: np.ndarray, v: np.ndarray) -> np.ndarray:
    if src.multi_query:
      return np.concatenate([a.reshape(-1) for a in (q, kk, v)])
    return np.stack([q, kk, v], axis=1).reshape(-1)

  fused = q_rows + 2 * kv_rows
  out = [_whole(EMBED, "transformer.embedding.word_embeddings.weight", (text_size, d),
                same, same),
         _per_layer((("layers", "attn_norm", "scale"),), "input_layernorm.weight", n, (d,),
                    lambda a: (a,), same),
         _per_layer(tuple((*attn, x) for x in "qkv"), "self_attention.query_key_value.weight",
                    n, (fused, d), split_weight, join_weight)]
  if m.qkv_bias:
    out.append(_per_layer(tuple((*attn, f"{x}_bias") for x in "qkv"),
                          "self_attention.query_key_value.bias", n, (fused,), split_bias,
                          join_bias))
  out += [
      # o [H, Dh, D] <-> dense [D, H Dh]
      _per_layer(((*attn, "o"),), "self_attention.dense.weight", n, (d, q_rows),
                 lambda w: (w.T.reshape(h, dh, d),), lambda a: a.reshape(q_rows, d).T),
      _per_layer((("layers", "mlp_norm", "scale"),), "post_attention_layernorm.weight", n, (d,),
                 lambda a: (a,), same),
      _per_layer(((*mlp, "gate"), (*mlp, "up")), "mlp.dense_h_to_4h.weight", n, (2 * f, d),
                 lambda w: (w[:f].T, w[f:].T),
                 lambda g, u: np.concatenate([g.T, u.T], axis=0)),
      _per_layer(((*mlp, "down"),), "mlp.dense_4h_to_h.weight", n, (d, f),
                 lambda w: (w.T,), lambda a: a.T),
      _whole(("final_norm", "scale"), "transformer.encoder.final_layernorm.weight", (d,),
             same, same),
      _whole(LM_HEAD, "transformer.output_layer.weight", (text_size, d),
             lambda a: a.T, lambda w: w.T),
  ]
  return out


IGNORABLE_SUFFIXES = ("rotary_pos_emb.inv_freq",)
