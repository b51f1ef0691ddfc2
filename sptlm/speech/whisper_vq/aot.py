"""Ahead-of-time figures for an imported WhisperVQ encoder on a TPU slice (`sptlm compile`'s
machinery): memory per device of the sharded tokenize step, and the FLOP-bound hours of audio
a chip tokenizes in an hour.

  sptlm tokenizer compile --topology v5e-8                  # GLM-4-Voice's full-size encoder
  sptlm tokenizer compile --topology v5p-8 --workdir runs/glm4voice_tokenizer

One step tokenizes `per_device_batch` 30 s windows on every chip (data parallel, parameters on
each chip). FLOPs are counted analytically per window (2 per multiply-add; attention over the
whole 1,500 x 1,500 frame matrix, as the masked kernel computes it): the FLOP-bound rate is
peak / FLOPs, an upper bound. float32 matrix products at "highest" precision take about six
bf16 MXU passes on TPU, so both rates are printed.
"""

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sptlm import aot
from sptlm.speech.whisper_vq import config as config_lib
from sptlm.speech.whisper_vq import features
from sptlm.speech.whisper_vq import model as model_lib
from sptlm.speech.whisper_vq import tokenizer as tokenizer_lib
from sptlm.speech.whisper_vq.config import WhisperVQConfig
from sptlm.train import flops as flops_lib

GB = 1e9
F32_PASSES = 6  # bf16 MXU passes of one float32 matmul at "highest" precision
# GLM-4-Voice's tokenizer: whisper-large-v3's encoder width, quantizer after layer 16 of 32.
FULL_SIZE = {
    "architectures": ["WhisperVQEncoder"], "model_type": "whisper", "d_model": 1280,
    "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "encoder_layers": 32,
    "num_mel_bins": 128, "max_source_positions": 1500, "activation_function": "gelu",
    "pooling_kernel_size": 4, "pooling_type": "avg", "pooling_position": 16,
    "quantize_position": 16, "quantize_vocab_size": 16384, "quantize_causal_block_size": 200,
    "encoder_causal_convolution": True, "encoder_causal_attention": False,
    "quantize_causal_encoder": False}


def full_size() -> WhisperVQConfig:
  return config_lib.from_dict(FULL_SIZE, "the GLM-4-Voice tokenizer's architecture")


def num_params(cfg: WhisperVQConfig) -> int:
  d, e = cfg.d_model, cfg.ffn_dim
  layer = 4 * d * d + 3 * d + 2 * d * e + e + d + 4 * d  # q,k,v,out (k without bias), MLP, LNs
  return (3 * cfg.num_mel_bins * d + d + 3 * d * d + d + cfg.max_source_positions * d
          + cfg.quantize_position * layer + cfg.codebook_size * d)


def window_flops(cfg: WhisperVQConfig) -> float:
  """Forward FLOPs of one 30 s window (3,000 mel frames, 1,500 encoder frames, 375 tokens)."""
  d, e, m = cfg.d_model, cfg.ffn_dim, cfg.num_mel_bins
  f = features.WINDOW_SAMPLES // features.HOP
  t, n = f // 2, f // 8

  def layer(length: int) -> float:
    return 2 * length * (4 * d * d + 2 * d * e) + 2 * 2 * length * length * d

  convs = 2 * 3 * f * m * d + 2 * 3 * t * d * d
  layers = (cfg.pooling_position * layer(t)
            + (cfg.quantize_position - cfg.pooling_position) * layer(n))
  return convs + layers + 2 * n * cfg.codebook_size * d


def _peak(kind: str) -> float | None:
  for name, peak in sorted(flops_lib.PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name):
      return peak
  return None


def compile_encoder(cfg: WhisperVQConfig, topology: str, *, per_device_batch: int = 8,
                    precision: str = "highest") -> dict[str, Any]:
  """Compiles the tokenize step for `topology`; memory per device and throughput bounds."""
  if per_device_batch < 1:
    raise aot.AotError(f"--per-device-batch={per_device_batch} must be at least 1")
  topo = aot.parse_topology(topology)
  devices = aot.topology_devices(topo)
  mesh = tokenizer_lib.data_mesh(devices)
  batch = per_device_batch * len(devices)
  fn = tokenizer_lib.make_tokenize(cfg, mesh, precision)
  replicated = NamedSharding(mesh, P())
  abstract_params = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=replicated),
      nnx.split(model_lib.abstract(cfg), nnx.Param)[1].to_pure_dict())
  frames = features.WINDOW_SAMPLES // features.HOP
  mel = jax.ShapeDtypeStruct((batch, frames, cfg.num_mel_bins), jnp.float32)
  samples = jax.ShapeDtypeStruct((batch,), jnp.int32)
  start = time.perf_counter()
  try:
    compiled = fn.lower(abstract_params, mel, samples).compile()
  except jax.errors.JaxRuntimeError as e:
    raise aot.AotError(f"XLA could not compile the encoder for {topo.name}: "
                       f"{str(e).strip().splitlines()[0]}") from e
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  if mem is None:
    raise aot.AotError(f"the TPU compiler gave no memory analysis for {topo.name}")
  kind = devices[0].device_kind
  peak = _peak(kind)
  wf = window_flops(cfg)

  def audio_hours(flops_per_second: float) -> float:  # windows per hour x 30 s, in hours
    return flops_per_second * features.WINDOW_SECONDS / wf

  xla = aot._cost_flops(compiled)
  return {
      "topology": topo.name, "jax_topology": topo.jax_name, "device_kind": kind,
      "num_devices": len(devices), "per_device_batch": per_device_batch,
      "precision": precision, "architecture": dataclasses.asdict(cfg),
      "num_params": num_params(cfg), "compile_seconds": seconds,
      "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
      "temp_bytes": mem.temp_size_in_bytes,
      "total_bytes": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
      "hbm_bytes_per_device": topo.hbm_bytes_per_device,
      "window_flops": wf, "xla_flops_per_device": xla,
      "peak_flops_per_device": peak,
      "audio_hours_per_chip_hour_bf16_peak": audio_hours(peak) if peak else None,
      "audio_hours_per_chip_hour_f32": audio_hours(peak / F32_PASSES) if peak else None,
  }


def format_report(r: dict[str, Any]) -> str:
  a = r["architecture"]
  hbm = r["hbm_bytes_per_device"]
  lines = [
      f"WhisperVQ encoder (d_model {a['d_model']}, {a['quantize_position']} layers to the "
      f"quantizer, {a['codebook_size']} codes) on {r['topology']} ({r['num_devices']} x "
      f"{r['device_kind']}), compiled in {r['compile_seconds']:.1f} s",
      f"{r['per_device_batch']} windows of 30 s per device per step; "
      f"{r['num_params'] / 1e6:.1f}M parameters on every device; precision {r['precision']}",
      "",
      f"{'memory per device':<34}{'GB':>10}",
      f"{'  arguments (params, features)':<34}{r['argument_bytes'] / GB:10.3f}",
      f"{'  outputs (codes, hidden)':<34}{r['output_bytes'] / GB:10.3f}",
      f"{'  temporaries':<34}{r['temp_bytes'] / GB:10.3f}",
      f"{'  total':<34}{r['total_bytes'] / GB:10.3f}   ({100 * r['total_bytes'] / hbm:.0f}% of "
      f"{hbm / GB:.0f} GB HBM)",
      "",
      f"{'FLOPs per 30 s window':<34}{r['window_flops']:10.3e}",
  ]
  if r.get("xla_flops_per_device"):
    lines.append(f"{'FLOPs per device-step (XLA)':<34}{r['xla_flops_per_device']:10.3e}"
                 "   (loop bodies counted once)")
  if r.get("peak_flops_per_device"):
    lines += [
        f"{'audio hours per chip-hour, bound':<34}"
        f"{r['audio_hours_per_chip_hour_bf16_peak']:10.0f}   (at the bf16 peak, "
        f"{r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s)",
        f"{'  at float32 (highest)':<34}{r['audio_hours_per_chip_hour_f32']:10.0f}"
        f"   ({F32_PASSES} bf16 passes per matmul)"]
  return "\n".join(lines)
