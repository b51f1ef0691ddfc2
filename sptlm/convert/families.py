"""The Hugging Face model families whose math is exactly sptlm's, and how their configs map.

  llama  LlamaForCausalLM  rotate-half rotary over the whole head, no biases
  qwen2  Qwen2ForCausalLM  rotate-half rotary, biases on q/k/v (always)
  glm    GlmForCausalLM    interleaved rotary on the first partial_rotary_factor of each head,
                           optional q/k/v biases, gate and up fused into one gate_up_proj

All three: pre-norm RMSNorm blocks, SwiGLU MLP, no o_proj bias, scale Dh^-0.5, default rope.
"""

import dataclasses
from collections.abc import Collection
from typing import Any

from sptlm.config import Config, ModelConfig
from sptlm.convert import ConversionError

# The ModelConfig fields that decide the math (from-hf takes them from the Hugging Face model);
# the others (attention backend, remat, scan, dtypes, init) are how sptlm runs it.
ARCH_KEYS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "d_ff",
             "rope_theta", "rope_fraction", "rope_style", "qkv_bias", "tie_embeddings",
             "norm_eps")


@dataclasses.dataclass(frozen=True)
class Family:
  name: str  # the Hugging Face model_type
  architecture: str
  rope_style: str
  bias: str  # "never", "always" or "optional" (config attention_bias)
  fused_gate_up: bool


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", "rotate_half", "never", False),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "rotate_half", "always", False),
    "glm": Family("glm", "GlmForCausalLM", "interleaved", "optional", True),
}


@dataclasses.dataclass(frozen=True)
class Derived:
  """One config key that from-hf takes from the Hugging Face model."""

  key: str  # e.g. "model.num_layers"
  configured: Any  # the --config run's value
  value: Any  # the Hugging Face model's

  @property
  def changed(self) -> bool:
    return self.configured != self.value

  def __str__(self) -> str:
    if self.changed:
      return f"{self.key}: {self.configured!r} -> {self.value!r}"
    return f"{self.key}: {self.value!r}"


_UNSUPPORTED_TYPES = {
    "glm4": "GLM-4-0414 (model_type 'glm4') adds norms after each sub-layer, which sptlm's "
            "block does not have; GLM-4-9B (model_type 'glm', e.g. THUDM/glm-4-9b-hf) is supported",
}


def for_model(model: ModelConfig, preferred: str | None = None) -> Family:
  """The family whose standard class computes exactly this model (the recorded one if it can)."""
  problems = {name: _cannot_express(fam, model) for name, fam in FAMILIES.items()}
  if preferred in FAMILIES and problems[preferred] is None:
    return FAMILIES[preferred]
  # Llama before Qwen2 before GLM: the plainest class that fits.
  for name in ("llama", "qwen2", "glm"):
    if problems[name] is None:
      return FAMILIES[name]
  raise ConversionError(
      "no standard Hugging Face class computes this model exactly: "
      + "; ".join(f"{n}: {p}" for n, p in problems.items()))


def _cannot_express(fam: Family, m: ModelConfig) -> str | None:
  if m.rope_style != fam.rope_style:
    return f"model.rope_style={m.rope_style!r} (it uses {fam.rope_style!r})"
  if fam.rope_style == "rotate_half" and m.rope_fraction != 1.0:
    return f"model.rope_fraction={m.rope_fraction} (it rotates whole heads)"
  if fam.bias == "never" and m.qkv_bias:
    return "model.qkv_bias=True (its attention_bias also adds an o_proj bias)"
  if fam.bias == "always" and not m.qkv_bias:
    return "model.qkv_bias=False (it always has q/k/v biases)"
  if fam.name == "llama" and m.d_model % m.num_heads:
    return f"model.d_model={m.d_model} is not a multiple of model.num_heads={m.num_heads}"
  return None


def hf_config_kwargs(fam: Family, m: ModelConfig, vocab_size: int) -> dict[str, Any]:
  """The Hugging Face config fields that reproduce `m`'s math (vocab_size: the padded size)."""
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
  if fam.name == "glm":
    rope["partial_rotary_factor"] = float(m.rope_fraction)
  kwargs: dict[str, Any] = dict(
      vocab_size=vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, hidden_act="silu",
      rms_norm_eps=float(m.norm_eps), rope_parameters=rope,
      tie_word_embeddings=bool(m.tie_embeddings), architectures=[fam.architecture])
  if fam.name == "llama":
    kwargs.update(attention_bias=False, mlp_bias=False)
  elif fam.name == "glm":
    kwargs.update(attention_bias=bool(m.qkv_bias))
  elif fam.name == "qwen2":
    kwargs.update(use_sliding_window=False)
  return kwargs


def from_hf_config(hf: Any) -> tuple[Family, dict[str, Any], int]:
  """(family, ModelConfig arch fields, text vocabulary size) of a transformers config object."""
  model_type = getattr(hf, "model_type", None)
  if model_type in _UNSUPPORTED_TYPES:
    raise ConversionError(f"model_type {model_type!r} is not supported: "
                          f"{_UNSUPPORTED_TYPES[model_type]}")
  if model_type not in FAMILIES:
    raise ConversionError(f"model_type {model_type!r} is not supported; known: "
                          f"{', '.join(FAMILIES)}")
  fam = FAMILIES[model_type]

  def need(key: str, ok: bool, what: str) -> None:
    if not ok:
      raise ConversionError(f"config.json {key}={getattr(hf, key, None)!r}: sptlm needs {what}")

  need("hidden_act", getattr(hf, "hidden_act", "silu") == "silu", "'silu' (SwiGLU)")
  rope = dict(getattr(hf, "rope_parameters", None) or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ConversionError(f"config.json rope_parameters.rope_type={rope_type!r}: sptlm has only "
                          "the default rotary (no llama3/yarn/linear scaling)")
  if fam.name == "llama":
    need("attention_bias", not getattr(hf, "attention_bias", False), "False (no o_proj bias)")
    need("mlp_bias", not getattr(hf, "mlp_bias", False), "False")
  if fam.name == "qwen2":
    need("use_sliding_window", not getattr(hf, "use_sliding_window", False), "False")
  heads = hf.num_attention_heads
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
  if fam.name == "glm":
    fraction = float(rope.get("partial_rotary_factor",
                              getattr(hf, "partial_rotary_factor", 0.5)))
    qkv_bias = bool(getattr(hf, "attention_bias", True))
  else:  # Llama and Qwen2 rotate whole heads whatever partial_rotary_factor says
    fraction = 1.0
    qkv_bias = fam.bias == "always"
  fields = dict(
      num_layers=hf.num_hidden_layers, d_model=hf.hidden_size, num_heads=heads,
      num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads, head_dim=head_dim,
      d_ff=hf.intermediate_size, rope_theta=float(rope.get("rope_theta", 10_000.0)),
      rope_fraction=fraction, rope_style=fam.rope_style, qkv_bias=qkv_bias,
      tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
      norm_eps=float(hf.rms_norm_eps))
  return fam, fields, int(hf.vocab_size)


def derive(cfg: Config, fields: dict[str, Any], text_size: int, pinned: Collection[str],
           source: str, vocab_fields: dict[str, Any] | None = None
           ) -> tuple[Config, tuple[Derived, ...]]:
  """`cfg` with the Hugging Face model's arch keys and text vocabulary in place of its own.

  `vocab_fields`: further vocab keys the model dictates (an adopted layout's ids). A key in
  `pinned` (set explicitly on the command line) must already agree: the user asked for
  something the checkpoint cannot give, so that is an error naming both values.
  """
  vocab = {"text_size": text_size, **(vocab_fields or {})}
  rows = tuple(Derived(f"model.{key}", getattr(cfg.model, key), fields[key])
               for key in ARCH_KEYS) + tuple(
                   Derived(f"vocab.{key}", getattr(cfg.vocab, key), value)
                   for key, value in vocab.items())
  for row in rows:
    if row.key in pinned and row.changed:
      raise ConversionError(
          f"{row.key}={row.configured!r} on the command line but the Hugging Face model "
          f"{source} has {row.value!r}: from-hf takes the model from its config.json; drop "
          f"--config.{row.key}")
  model = dataclasses.replace(cfg.model, **fields)
  return dataclasses.replace(cfg, model=model, vocab=dataclasses.replace(cfg.vocab, **vocab)), rows
