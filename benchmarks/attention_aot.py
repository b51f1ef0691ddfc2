"""Attention memory on TPU, compiled ahead of time on this host (no TPU needed).

  JAX_PLATFORMS=cpu python benchmarks/attention_aot.py            # one layer, all backends
  JAX_PLATFORMS=cpu python benchmarks/attention_aot.py --models   # + lm_1b / glm4_9b steps

One layer's attention forward and backward at sequence 8,192 (batch 1 per device, 32 query
heads, 2 kv heads, head dim 128, bfloat16, causal, packed segment ids) compiled for a v5p-8
(4 chips, batch 4 split over them) with: the pure-JAX reference (whole and chunked), our
Pallas flash kernel (the `pallas` backend, as the model calls it), and the splash attention
kernel that ships with JAX (what MaxText uses) at blocks of 128 and 512. The figure is the
compiler's temporary memory per device; arguments (q, k, v, dO) and outputs are the same for
all and left out. With --models it also compiles the full train steps of lm_1b and glm4_9b
(attention=pallas vs reference) through `sptlm.aot.compile_for_topology`.
"""

import argparse
import functools
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding, PartitionSpec as P

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sptlm import aot, config, sharding  # noqa: E402
from sptlm.model import attention  # noqa: E402

GB = 1e9
RULES = (("batch", ("data", "fsdp")), ("heads", ("tensor",)), ("kv_heads", ("tensor",)))


def splash_backend(block: int) -> Callable[..., jax.Array]:
  """Splash attention behind our backend interface ([B, L, H, Dh] in and out), as MaxText
  wires it: transpose to heads-major, vmap the kernel over the batch, shard_map over devices."""

  def per_device(q, k, v, seg):
    b, l, h, _ = q.shape
    mask = splash.MultiHeadMask([splash.CausalMask((l, l)) for _ in range(h)])
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block,
                              block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v),
                           segment_ids=splash.SegmentIds(seg, seg))
    return heads_major(out)

  def backend(q, k, v, seg):
    mesh, _ = sharding.current()
    spec = P(("data", "fsdp"))
    return jax.shard_map(per_device, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec,
                         check_vma=False)(q, k, v, seg)

  return backend


def layer_memory(name: str, backend: Callable[..., jax.Array], devices: list[Any],
                 seq: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, Any]:
  """Temporary bytes per device of attention forward + backward, compiled for `devices`."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": len(devices), "tensor": 1}, devices)
  batch = len(devices)  # one row per device
  row = NamedSharding(mesh, P(("data", "fsdp")))
  q = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.bfloat16, sharding=row)
  kv = jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), jnp.bfloat16, sharding=row)
  seg = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=row)

  def fwd_bwd(q, k, v, seg, do):
    with sharding.logical_rules(mesh, RULES):
      out, vjp = jax.vjp(lambda q, k, v: backend(q, k, v, seg), q, k, v)
      return vjp(do)

  start = time.perf_counter()
  compiled = jax.jit(fwd_bwd, out_shardings=(row,) * 3).lower(q, kv, kv, seg, q).compile()
  mem = compiled.memory_analysis()
  return {"name": name, "temp_gb": mem.temp_size_in_bytes / GB,
          "compile_s": time.perf_counter() - start}


def layer_table(seq: int = 8192, heads: int = 32, kv_heads: int = 2, head_dim: int = 128,
                topology: str = "v5p-8") -> list[dict[str, Any]]:
  devices = aot.topology_devices(aot.parse_topology(topology))
  backends = {
      "reference (whole)": attention.reference_attention,
      "reference (chunk 1024)": functools.partial(attention.reference_attention, chunk=1024),
      "pallas (ours, 512)": attention.pallas_attention,
      "pallas (ours, 128)": functools.partial(attention.pallas_attention, block_q=128,
                                              block_kv=128),
      "splash 128": splash_backend(128),
      "splash 512": splash_backend(512),
  }
  rows = []
  for name, fn in backends.items():
    r = layer_memory(name, fn, devices, seq, heads, kv_heads, head_dim)
    print(f"{name:<24} temp {r['temp_gb']:8.3f} GB/device   (compiled in {r['compile_s']:.1f} s)",
          flush=True)
    rows.append(r)
  return rows


def model_table(topology: str, names: list[str], backends: list[str],
                overrides: list[str]) -> list[dict[str, Any]]:
  """Full train steps (one row of 8,192 tokens per device) with each attention backend.

  "splash" and "none" are not config values: they run as the `pallas` entry of the backend
  registry, swapped in this process only for `splash_backend(512)` or for attention that
  returns q untouched ("none": the step's floor, what everything but attention takes).
  """
  stand_ins = {"splash": splash_backend(512), "none": lambda q, k, v, seg, **_: q}
  rows = []
  for name in names:
    for backend in backends:
      as_config = "pallas" if backend in stand_ins else backend
      cfg = config.load(REPO / "configs" / f"{name}.py",
                        [f"--config.model.attention={as_config}", *overrides])
      saved = attention.BACKENDS["pallas"]
      if backend in stand_ins:
        attention.BACKENDS["pallas"] = stand_ins[backend]
      try:
        r = aot.compile_for_topology(cfg, topology, per_device_batch=1)
      finally:
        attention.BACKENDS["pallas"] = saved
      print(f"{name:<8} {backend:<10} {' '.join(overrides)} total "
            f"{r['total_bytes'] / GB:7.2f} GB/device, temp {r['temp_bytes'] / GB:7.2f}, "
            f"args {r['argument_bytes'] / GB:6.2f}; "
            f"{r['flops_per_step']:.3e} FLOPs/step ({r['flops_per_device']:.3e}/device); "
            f"compiled in {r['compile_seconds']:.0f} s", flush=True)
      rows.append(dict(r, backend=backend))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", action="store_true", help="also compile lm_1b / glm4_9b")
  parser.add_argument("--only-models", action="store_true")
  parser.add_argument("--topology", default="v5p-128", help="for the model train steps")
  parser.add_argument("--configs", default="lm_1b,glm4_9b")
  parser.add_argument("--backends", default="reference,pallas,splash,none")
  parser.add_argument("overrides", nargs="*", help="config overrides for the model steps, "
                      "e.g. --config.model.loss_chunk=1024 (after --)")
  args = parser.parse_args()
  if not args.only_models:
    layer_table()
  if args.models or args.only_models:
    model_table(args.topology, args.configs.split(","), args.backends.split(","),
                args.overrides)


if __name__ == "__main__":
  main()
