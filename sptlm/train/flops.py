"""Analytic FLOPs of a train step and the peak FLOP/s that MFU is measured against."""

import time

import jax
import jax.numpy as jnp

from sptlm.config import ModelConfig

# Dense bf16 peak per device (chip for TPU), from vendor datasheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def forward_flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
  """Matmul FLOPs of one token's forward pass (2 per multiply-add); causal attention halved."""
  d, h, k, dh, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  proj = d * dh * (h + 2 * k) + h * dh * d  # q, k, v, o
  mlp = 3 * d * f
  attn = 2 * h * dh * seq_len / 2  # scores and weighted sum over on average L/2 keys
  per_layer = 2 * (proj + mlp) + 2 * attn
  return cfg.num_layers * per_layer + 2 * d * vocab_size


def train_flops_per_step(cfg: ModelConfig, vocab_size: int, seq_len: int, batch: int) -> float:
  """Forward + backward (2x forward) model FLOPs; rematerialization is not counted."""
  return 3 * forward_flops_per_token(cfg, vocab_size, seq_len) * seq_len * batch


def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float, str]:
  """Datasheet peak for accelerators; for a CPU, the best matmul rate measured right now."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name):
      return peak, f"datasheet ({kind})"
  return measure_matmul_flops(device), f"measured matmul ({kind or device.platform})"


def measure_matmul_flops(device: jax.Device, n: int = 1024, repeats: int = 5) -> float:
  """The fastest of a few float32 n x n matmuls on `device`: the practical peak of a CPU."""
  x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  mm = jax.jit(lambda a: a @ a)
  mm(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    mm(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best
