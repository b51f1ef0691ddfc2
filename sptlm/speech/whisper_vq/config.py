"""A released WhisperVQ tokenizer's config.json -> the frozen architecture sptlm runs.

Only the keys that shape the path from audio to tokens are read (GLM-4-Voice's
configuration_whisper.py names them); the decoder's keys and training-only quantizer keys
(commit coefficient, EMA decay, restart interval) do not change a token and are ignored. A
value sptlm cannot run raises an `ImportCheckError` naming the key and what it holds.
"""

import dataclasses
import json
import pathlib
from typing import Any

from sptlm.errors import InputError

ARCHITECTURES = ("WhisperVQEncoder", "WhisperVQForConditionalGeneration", "WhisperVQModel")
POOL = 4  # 50 Hz encoder frames per 12.5 Hz token: sptlm's token rate (1,280 samples a token)
WINDOW_POSITIONS = 1500  # 30 s windows at 50 Hz: the reference cuts long audio into these


class ImportCheckError(InputError):
  """A checkpoint folder sptlm cannot run as it is; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class WhisperVQConfig:
  """The encoder up to the quantizer (names: the released config.json's, shortened)."""

  num_mel_bins: int  # 128 (whisper-large-v3)
  d_model: int  # 1280
  num_heads: int  # encoder_attention_heads: 20
  ffn_dim: int  # encoder_ffn_dim: 5120
  encoder_layers: int  # 32: the full encoder (the layers above the quantizer are not run)
  max_source_positions: int  # rows of embed_positions: 1500
  pooling_position: int  # average pooling x4 after this many layers (16)
  quantize_position: int  # the quantizer after this many layers (16): the layers that run
  codebook_size: int  # quantize_vocab_size: 16384
  block_size: int  # quantize_causal_block_size in 50 Hz frames (200 = 4 s); 0: bidirectional
  causal_convolution: bool  # encoder_causal_convolution: conv1 / conv2 see only the past
  causal_attention: bool  # encoder_causal_attention or quantize_causal_encoder: frame-causal

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def _get(raw: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...],
         default: Any = dataclasses.MISSING) -> Any:
  if key not in raw or raw[key] is None:
    if default is dataclasses.MISSING:
      raise ImportCheckError(f"{where}: key {key!r} is missing; a WhisperVQ tokenizer needs it")
    return default
  value = raw[key]
  if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
    name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise ImportCheckError(f"{where}: key {key!r} is {value!r}, not a {name}")
  return value


def _at_least(key: str, value: int, low: int, where: str, why: str = "") -> None:
  if value < low:
    raise ImportCheckError(f"{where}: {key}={value} must be at least {low}{why}")


def from_dict(raw: dict[str, Any], where: str = "config.json") -> WhisperVQConfig:
  """Checks every key the tokenizer path reads and says which one sptlm cannot run."""
  archs = raw.get("architectures")
  if archs is not None:
    if not isinstance(archs, list) or not any(a in ARCHITECTURES for a in archs):
      raise ImportCheckError(f"{where}: architectures={archs!r} is not a WhisperVQ tokenizer "
                             f"(expected one of {', '.join(ARCHITECTURES)})")
  elif "quantize_vocab_size" not in raw:
    raise ImportCheckError(f"{where}: no 'architectures' and no 'quantize_vocab_size': not a "
                           "WhisperVQ tokenizer config")
  if raw.get("model_type", "whisper") != "whisper":
    raise ImportCheckError(f"{where}: model_type={raw['model_type']!r}; a WhisperVQ tokenizer "
                           "is a 'whisper' model")
  act = _get(raw, "activation_function", where, str, "gelu")
  if act != "gelu":
    raise ImportCheckError(f"{where}: activation_function={act!r}; sptlm's Whisper layers use "
                           "'gelu' (exact) only")
  pooling_type = _get(raw, "pooling_type", where, str, "max (the reference's default)")
  if pooling_type != "avg":
    raise ImportCheckError(f"{where}: pooling_type is {pooling_type!r}; sptlm runs average "
                           "pooling ('avg') only")
  mels = _get(raw, "num_mel_bins", where, int)
  d = _get(raw, "d_model", where, int)
  heads = _get(raw, "encoder_attention_heads", where, int)
  ffn = _get(raw, "encoder_ffn_dim", where, int)
  layers = _get(raw, "encoder_layers", where, int)
  positions = _get(raw, "max_source_positions", where, int)
  kernel = _get(raw, "pooling_kernel_size", where, int)
  pool_at = _get(raw, "pooling_position", where, int, 0)
  quant_at = _get(raw, "quantize_position", where, int, 16)
  codes = _get(raw, "quantize_vocab_size", where, int)
  block = _get(raw, "quantize_causal_block_size", where, int, 0)
  for key, value in (("num_mel_bins", mels), ("d_model", d), ("encoder_attention_heads", heads),
                     ("encoder_ffn_dim", ffn), ("encoder_layers", layers)):
    _at_least(key, value, 1, where)
  if d % heads:
    raise ImportCheckError(f"{where}: d_model={d} is not a multiple of "
                           f"encoder_attention_heads={heads}")
  if kernel != POOL:
    raise ImportCheckError(f"{where}: pooling_kernel_size={kernel} makes "
                           f"{50 / kernel:g} Hz tokens; sptlm tokenizers make 12.5 Hz tokens "
                           f"(pooling_kernel_size {POOL})")
  _at_least("quantize_position", quant_at, 1, where, " (the quantizer follows that many layers)")
  if quant_at > layers:
    raise ImportCheckError(f"{where}: quantize_position={quant_at} is above "
                           f"encoder_layers={layers}")
  if not 1 <= pool_at <= quant_at:
    raise ImportCheckError(f"{where}: pooling_position={pool_at} must be within 1.."
                           f"quantize_position={quant_at} (pooling before the quantizer; 0 "
                           "never pools, which would make 50 Hz tokens)")
  _at_least("quantize_vocab_size", codes, 2, where)
  _at_least("quantize_causal_block_size", block, 0, where, " (null: bidirectional attention)")
  if block and pool_at < quant_at and block < kernel:
    raise ImportCheckError(f"{where}: quantize_causal_block_size={block} leaves no block after "
                           f"{kernel}x pooling (layers {pool_at}..{quant_at - 1} run pooled)")
  if positions < WINDOW_POSITIONS:
    raise ImportCheckError(f"{where}: max_source_positions={positions} holds fewer than the "
                           f"{WINDOW_POSITIONS} frames of a 30 s window")
  causal_attention = (_get(raw, "encoder_causal_attention", where, bool, False)
                      or _get(raw, "quantize_causal_encoder", where, bool, False))
  return WhisperVQConfig(
      num_mel_bins=mels, d_model=d, num_heads=heads, ffn_dim=ffn, encoder_layers=layers,
      max_source_positions=positions, pooling_position=pool_at, quantize_position=quant_at,
      codebook_size=codes, block_size=block,
      causal_convolution=_get(raw, "encoder_causal_convolution", where, bool, False),
      causal_attention=causal_attention)


def read(folder: pathlib.Path) -> tuple[WhisperVQConfig, dict[str, Any]]:
  """(checked config, the raw JSON) of a checkpoint folder."""
  path = folder / "config.json"
  if not folder.is_dir():
    raise ImportCheckError(f"{folder}: no such directory")
  if not path.is_file():
    raise ImportCheckError(f"{folder}: no config.json; a WhisperVQ checkpoint folder holds "
                           "config.json and model*.safetensors")
  raw = read_json_object(path)
  return from_dict(raw, str(path)), raw


def read_json_object(path: pathlib.Path) -> dict[str, Any]:
  """A JSON object from a checkpoint folder; anything else is a one-line ImportCheckError."""
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ImportCheckError(f"{path}: unreadable JSON ({e})") from None
  if not isinstance(raw, dict):
    raise ImportCheckError(f"{path}: not a JSON object")
  return raw
