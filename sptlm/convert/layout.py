"""Which sptlm parameter becomes which Hugging Face tensor, and how it is reshaped.

sptlm keeps per-head weights ([D, H, Dh], [H, Dh, D]), stacks layers on a leading axis N and
multiplies x @ W; torch.nn.Linear stores W^T as [out, in] with heads flattened into out. A
`Group` is one or more stacked sptlm leaves and the Hugging Face tensors they become (GLM's
gate_up_proj needs two leaves). Each direction is a transpose and a reshape, so a round trip
is bit-exact.
"""

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from sptlm.config import ModelConfig
from sptlm.convert.families import Family

Path = tuple[str, ...]
Read = Callable[[str], np.ndarray]  # a Hugging Face tensor by name
Get = Callable[[Path, int | None], np.ndarray]  # an sptlm leaf, or one layer of it

EMBED: Path = ("embed",)
LM_HEAD: Path = ("lm_head",)


@dataclasses.dataclass(frozen=True)
class Group:
  """Stacked sptlm leaves <-> the Hugging Face tensors they become."""

  leaves: tuple[Path, ...]
  hf_names: tuple[str, ...]
  export: Callable[[Get], Iterator[tuple[str, np.ndarray]]]  # reads layer by layer
  load: Callable[[Read, list[np.ndarray]], None]  # fills the preallocated leaves in place


def _layer(i: int, name: str) -> str:
  return f"model.layers.{i}.{name}"


def _per_layer(leaf: Path, hf: str, n: int, to_hf: Callable[[np.ndarray], np.ndarray],
               from_hf: Callable[[np.ndarray], np.ndarray]) -> Group:
  """A stacked leaf whose layer i is one Hugging Face tensor."""
  names = tuple(_layer(i, hf) for i in range(n))

  def export(get: Get) -> Iterator[tuple[str, np.ndarray]]:
    for i in range(n):
      yield names[i], to_hf(get(leaf, i))

  def load(read: Read, out: list[np.ndarray]) -> None:
    for i in range(n):
      out[0][i] = from_hf(read(names[i]))

  return Group((leaf,), names, export, load)


def _whole(leaf: Path, hf: str, to_hf: Callable[[np.ndarray], np.ndarray],
           from_hf: Callable[[np.ndarray], np.ndarray]) -> Group:
  def export(get: Get) -> Iterator[tuple[str, np.ndarray]]:
    yield hf, to_hf(get(leaf, None))

  def load(read: Read, out: list[np.ndarray]) -> None:
    out[0][...] = from_hf(read(hf))

  return Group((leaf,), (hf,), export, load)


def _same(a: np.ndarray) -> np.ndarray:
  return a


def groups(fam: Family, m: ModelConfig) -> list[Group]:
  """Every parameter of a model `m` exported as family `fam`, in checkpoint order."""
  n, d, h, k, dh, f = m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff

  def heads_in(heads: int) -> tuple[Callable, Callable]:
    # sptlm [D, heads, Dh] <-> Linear weight [heads * Dh, D]
    return (lambda a: a.reshape(d, heads * dh).T,
            lambda w: w.T.reshape(d, heads, dh))

  def bias(heads: int) -> tuple[Callable, Callable]:
    return (lambda a: a.reshape(heads * dh), lambda b: b.reshape(heads, dh))

  out = [_whole(EMBED, "model.embed_tokens.weight", _same, _same)]
  attn = "self_attn"
  out.append(_per_layer(("layers", "attn_norm", "scale"), "input_layernorm.weight", n,
                        _same, _same))
  for name, heads in (("q", h), ("k", k), ("v", k)):
    out.append(_per_layer(("layers", "attn", name), f"{attn}.{name}_proj.weight", n,
                          *heads_in(heads)))
    if m.qkv_bias:
      out.append(_per_layer(("layers", "attn", f"{name}_bias"), f"{attn}.{name}_proj.bias", n,
                            *bias(heads)))
  # sptlm o [H, Dh, D] <-> Linear weight [D, H * Dh]
  out.append(_per_layer(("layers", "attn", "o"), f"{attn}.o_proj.weight", n,
                        lambda a: a.reshape(h * dh, d).T, lambda w: w.T.reshape(h, dh, d)))
  out.append(_per_layer(("layers", "mlp_norm", "scale"), "post_attention_layernorm.weight", n,
                        _same, _same))
  if fam.fused_gate_up:
    out.append(_gate_up(n, f))
  else:
    for name in ("gate", "up"):
      out.append(_per_layer(("layers", "mlp", name), f"mlp.{name}_proj.weight", n,
                            lambda a: a.T, lambda w: w.T))
  out.append(_per_layer(("layers", "mlp", "down"), "mlp.down_proj.weight", n,
                        lambda a: a.T, lambda w: w.T))
  out.append(_whole(("final_norm", "scale"), "model.norm.weight", _same, _same))
  if not m.tie_embeddings:
    out.append(_whole(LM_HEAD, "lm_head.weight", lambda a: a.T, lambda w: w.T))
  return out


def _gate_up(n: int, f: int) -> Group:
  """GLM: gate_up_proj [2F, D] is gate^T stacked over up^T (the forward chunks it in two)."""
  leaves = (("layers", "mlp", "gate"), ("layers", "mlp", "up"))
  names = tuple(_layer(i, "mlp.gate_up_proj.weight") for i in range(n))

  def export(get: Get) -> Iterator[tuple[str, np.ndarray]]:
    for i in range(n):
      yield names[i], np.concatenate([get(leaves[0], i).T, get(leaves[1], i).T], axis=0)

  def load(read: Read, out: list[np.ndarray]) -> None:
    for i in range(n):
      w = read(names[i])
      out[0][i] = w[:f].T
      out[1][i] = w[f:].T

  return Group(leaves, names, export, load)


# Tensors some Hugging Face checkpoints carry that hold no parameters (recomputed buffers).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
