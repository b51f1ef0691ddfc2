"""The released WhisperVQ safetensors (GLM-4-Voice's key layout) <-> sptlm's parameters.

A release holds a whole Whisper model: `model.encoder.*` (conv1, conv2, embed_positions,
layers.i.*, layer_norm, codebook, embed_positions2, EMA buffers), `model.decoder.*` and maybe
`proj_out.*`. The tokenizer runs only conv1, conv2, embed_positions, layers below
quantize_position and the codebook; everything else the layout defines is skipped, anything
it does not define is an error that names the tensors, as is a needed tensor that is missing,
of another shape or of a dtype sptlm cannot read. Only safetensors are read (no pickle).

Torch layouts -> sptlm's: Linear weight [out, in] -> kernel [in, out] (q/k/v split into
[D, H, Dh], out_proj [H, Dh, D]); Conv1d weight [out, in, 3] -> [3, in, out]; LayerNorm
weight -> scale. Layers are stacked on a leading axis (sptlm.speech.model.Layers).
"""

import pathlib
import re
from collections.abc import Iterable

import numpy as np

from sptlm.speech.whisper_vq.config import ImportCheckError, WhisperVQConfig

ENCODER = "model.encoder."
SKIPPED_PREFIXES = ("model.decoder.", "proj_out.")  # the ASR decoder: not the tokenizer's
SKIPPED_ENCODER = ("layer_norm.weight", "layer_norm.bias", "embed_positions2.weight",
                   "ema_count", "ema_weight")  # above the quantizer, or training state
READABLE_DTYPES = ("F32", "F16", "BF16", "F64")
LAYER_TENSORS = (
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight",
    "self_attn.out_proj.bias", "self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
    "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "final_layer_norm.weight",
    "final_layer_norm.bias")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def _layer_shapes(cfg: WhisperVQConfig) -> dict[str, tuple[int, ...]]:
  d, e = cfg.d_model, cfg.ffn_dim
  shapes = {f"self_attn.{p}_proj.weight": (d, d) for p in ("q", "k", "v", "out")}
  shapes.update({f"self_attn.{p}_proj.bias": (d,) for p in ("q", "v", "out")})
  for norm in ("self_attn_layer_norm", "final_layer_norm"):
    shapes.update({f"{norm}.weight": (d,), f"{norm}.bias": (d,)})
  shapes.update({"fc1.weight": (e, d), "fc1.bias": (e,), "fc2.weight": (d, e), "fc2.bias": (d,)})
  assert set(shapes) == set(LAYER_TENSORS)
  return shapes


def needed_shapes(cfg: WhisperVQConfig) -> dict[str, tuple[int, ...]]:
  """{released name: shape} of every tensor the tokenizer runs."""
  d = cfg.d_model
  out = {"conv1.weight": (d, cfg.num_mel_bins, 3), "conv1.bias": (d,),
         "conv2.weight": (d, d, 3), "conv2.bias": (d,),
         "embed_positions.weight": (cfg.max_source_positions, d),
         "codebook.weight": (cfg.codebook_size, d)}
  layer = _layer_shapes(cfg)
  for i in range(cfg.quantize_position):
    out.update({f"layers.{i}.{k}": s for k, s in layer.items()})
  return {ENCODER + k: s for k, s in out.items()}


def _skipped(name: str, cfg: WhisperVQConfig) -> bool:
  """A tensor of the released layout that the tokenizer does not run."""
  if name.startswith(SKIPPED_PREFIXES):
    return True
  if not name.startswith(ENCODER):
    return False
  local = name[len(ENCODER):]
  if local in SKIPPED_ENCODER:
    return True
  m = _LAYER.fullmatch(local)
  return bool(m and cfg.quantize_position <= int(m.group(1)) < cfg.encoder_layers
              and m.group(2) in LAYER_TENSORS)


def _names(items: Iterable[str], limit: int = 6) -> str:
  items = sorted(items)
  more = f" and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def checkpoint_files(folder: pathlib.Path) -> list[pathlib.Path]:
  files = sorted(folder.glob("model*.safetensors"))
  if not files:
    pickles = sorted(p.name for p in folder.iterdir()
                     if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    hint = (f" (it has {', '.join(pickles)}: pickle files, which sptlm does not read; convert "
            "them to safetensors)" if pickles else "")
    raise ImportCheckError(f"{folder}: no model*.safetensors file{hint}")
  return files


def read(folder: pathlib.Path, cfg: WhisperVQConfig) -> dict[str, np.ndarray]:
  """{released name: float32 array} of the tensors the tokenizer runs, after every check."""
  from safetensors import SafetensorError, safe_open
  need = needed_shapes(cfg)
  where: dict[str, pathlib.Path] = {}
  extra, bad = [], []
  files = checkpoint_files(folder)
  handles = {}
  try:
    for path in files:
      try:
        f = handles[path] = safe_open(str(path), framework="flax")
        keys = list(f.keys())
      except (SafetensorError, OSError) as e:
        raise ImportCheckError(f"{path}: not a readable safetensors file ({e})") from None
      for key in keys:
        if key in where:
          raise ImportCheckError(f"{path}: tensor {key} is also in {where[key].name}")
        where[key] = path
        if key in need:
          s = f.get_slice(key)
          dtype, shape = s.get_dtype(), tuple(s.get_shape())
          if dtype not in READABLE_DTYPES:
            bad.append(f"{key} has dtype {dtype} (sptlm reads {', '.join(READABLE_DTYPES)})")
          elif shape != need[key]:
            bad.append(f"{key} has shape {list(shape)}, the config wants {list(need[key])}")
        elif not _skipped(key, cfg):
          extra.append(key)
    missing = sorted(set(need) - set(where))
    if missing:
      raise ImportCheckError(f"{folder}: missing tensors {_names(missing)}")
    if extra:
      hint = ""
      if any(k.startswith(("conv1.", "layers.", "codebook")) for k in extra):
        hint = " (the released layout prefixes encoder tensors with 'model.encoder.')"
      raise ImportCheckError(f"{folder}: tensors outside the WhisperVQ layout of config.json: "
                             f"{_names(extra)}{hint}")
    if bad:
      raise ImportCheckError(f"{folder}: {bad[0]}" + (f" (and {len(bad) - 1} more)"
                                                      if len(bad) > 1 else ""))
    import jax
    with jax.default_device(jax.devices("cpu")[0]):
      return {k: np.asarray(handles[where[k]].get_tensor(k), np.float32) for k in need}
  finally:
    handles.clear()


def write(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
  """float32 safetensors in the released layout (GLM-4-Voice's own loader reads it too)."""
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path),
            metadata={"format": "pt"})


def to_params(tensors: dict[str, np.ndarray], cfg: WhisperVQConfig) -> dict:
  """Released tensors -> the pure-dict parameters of `model.WhisperVQEncoder`."""
  t = {k[len(ENCODER):]: v for k, v in tensors.items()}
  h, dh, d = cfg.num_heads, cfg.head_dim, cfg.d_model

  def conv(name: str) -> dict:
    return {"kernel": t[f"{name}.weight"].transpose(2, 1, 0), "bias": t[f"{name}.bias"]}

  def layer(i: int) -> dict:
    p = f"layers.{i}."

    def heads_in(name: str) -> np.ndarray:  # [out, in] -> [D, H, Dh]
      return t[p + name].T.reshape(d, h, dh)

    def norm(name: str) -> dict:
      return {"scale": t[p + name + ".weight"], "bias": t[p + name + ".bias"]}

    return {
        "self_attn": {
            "q_proj": {"kernel": heads_in("self_attn.q_proj.weight"),
                       "bias": t[p + "self_attn.q_proj.bias"].reshape(h, dh)},
            "k_proj": {"kernel": heads_in("self_attn.k_proj.weight")},
            "v_proj": {"kernel": heads_in("self_attn.v_proj.weight"),
                       "bias": t[p + "self_attn.v_proj.bias"].reshape(h, dh)},
            "out_proj": {"kernel": t[p + "self_attn.out_proj.weight"].T.reshape(h, dh, d),
                         "bias": t[p + "self_attn.out_proj.bias"]}},
        "self_attn_layer_norm": norm("self_attn_layer_norm"),
        "final_layer_norm": norm("final_layer_norm"),
        "fc1": {"kernel": t[p + "fc1.weight"].T, "bias": t[p + "fc1.bias"]},
        "fc2": {"kernel": t[p + "fc2.weight"].T, "bias": t[p + "fc2.bias"]}}

  def stack(indices: range) -> dict:
    if not indices:
      return {}
    per = [layer(i) for i in indices]
    import jax
    return {"stack": jax.tree.map(lambda *xs: np.stack(xs), *per)}

  params = {"conv1": conv("conv1"), "conv2": conv("conv2"),
            "embed_positions": t["embed_positions.weight"],
            "layers": stack(range(cfg.pooling_position)),
            "pooled_layers": stack(range(cfg.pooling_position, cfg.quantize_position)),
            "codebook": t["codebook.weight"]}
  return {k: v for k, v in params.items() if not isinstance(v, dict) or v}  # no empty stacks
