"""Ahead-of-time compilation of the train step for a TPU topology, on any machine.

libtpu's compile-only client describes a whole TPU slice (devices with their coordinates) with
no TPU attached, so `sptlm compile` can tell on a laptop whether a config fits a v5p-128 before
any pod time is spent. It compiles exactly what trains: the step of `train.program.build`.

This works with JAX_PLATFORMS=cpu (the test setup): the topology API loads the TPU plugin on
its own and never initialises a TPU backend, so the process keeps computing on CPU.
"""

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any, NamedTuple

import jax

from sptlm import config as config_lib
from sptlm import sharding
from sptlm.config import Config
from sptlm.errors import UserError
from sptlm.train import flops as flops_lib
from sptlm.train import program as program_lib

GB = 1e9


class AotError(UserError, ValueError):
  """A topology or setup that cannot be compiled for; the CLI prints it as one line."""


@dataclasses.dataclass(frozen=True)
class _Generation:
  """What a Cloud TPU name means for one chip generation."""

  jax_name: str  # the generation as libtpu's topology names spell it
  counts_cores: bool  # v4/v5p names count TensorCores (2 per chip), v5e/v6e count chips
  dims: int  # 3D torus (v4, v5p) or 2D (v5e, v6e)
  chip_config: str  # "megacore": both TensorCores of a chip form one JAX device
  hbm_bytes: float  # per chip, from the datasheet


GENERATIONS = {
    "v4": _Generation("v4", True, 3, "megacore", 32e9),
    "v5p": _Generation("v5p", True, 3, "megacore", 95e9),
    "v5e": _Generation("v5e", False, 2, "default", 16e9),
    "v6e": _Generation("v6e", False, 2, "default", 32e9),
}
_ALIASES = {"v5litepod": "v5e", "v5": "v5p", "v6litepod": "v6e"}
# Slice shapes Cloud TPU offers below one full 4x4x4 cube, and the 2D pod slices.
_SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_FORMS = ("accepted: v5p-N / v4-N (N TensorCores, e.g. v5p-128), v5e-N / v5litepod-N / v6e-N "
          "(N chips, e.g. v5e-16), or a raw topology GEN:AxBxC / GEN:AxB (e.g. v5p:4x4x4, "
          "v5e:4x4)")


class Topology(NamedTuple):
  """A TPU slice as libtpu's topology API wants it."""

  jax_name: str  # e.g. "v5p:4x4x4"
  num_devices: int  # JAX devices (chips: v4/v5p run megacore)
  name: str  # the Cloud TPU name, e.g. "v5p-128"
  chip_config_name: str
  chips_per_host_bounds: tuple[int, int, int]
  wrap: tuple[bool, bool, bool]  # torus wraparound links per dimension
  hbm_bytes_per_device: float


def _cube_shape(chips: int) -> tuple[int, int, int]:
  """Full-cube slices (multiples of 4x4x4) in the most cubic shape Cloud TPU uses."""
  k = chips // 64
  best = min(((a, b, k // (a * b)) for a in range(1, k + 1) for b in range(a, k + 1)
              if k % (a * b) == 0 and k // (a * b) >= b), key=lambda t: (t[2], -t[0]))
  return tuple(4 * x for x in best)


def _shape_for(gen: _Generation, count: int, name: str) -> tuple[int, ...]:
  """The chip grid Cloud TPU gives a slice of `count` (cores or chips, per generation)."""
  if gen.dims == 2:
    if count not in _SHAPES_2D:
      raise AotError(f"topology {name!r}: {gen.jax_name} slices have "
                     f"{', '.join(map(str, _SHAPES_2D))} chips; {_FORMS}")
    return _SHAPES_2D[count]
  if count % 2:
    raise AotError(f"topology {name!r}: {gen.jax_name} names count TensorCores, two per chip; "
                   f"{_FORMS}")
  chips = count // 2
  if chips in _SMALL_3D:
    return _SMALL_3D[chips]
  if chips % 64 or not chips:
    raise AotError(f"topology {name!r}: {gen.jax_name}-N needs N in 8, 16, 32, 64 or a "
                   f"multiple of 128; {_FORMS}")
  return _cube_shape(chips)


def parse_topology(name: str) -> Topology:
  """Cloud TPU names (v5p-128, v5e-16) or raw topologies (v5p:4x4x4) -> what libtpu needs."""
  text = name.strip().lower()
  cloud = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
  raw = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", text)
  if not (cloud or raw):
    raise AotError(f"unknown topology {name!r}; {_FORMS}")
  key = (cloud or raw).group(1)
  gen_name = _ALIASES.get(key, key)
  if gen_name not in GENERATIONS:
    raise AotError(f"unknown TPU generation {key!r} in {name!r} (known: "
                   f"{', '.join(GENERATIONS)}); {_FORMS}")
  gen = GENERATIONS[gen_name]
  if cloud:
    shape = _shape_for(gen, int(cloud.group(2)), name)
  else:
    shape = tuple(int(s) for s in raw.group(2).split("x"))
    if len(shape) != gen.dims or min(shape) < 1:
      raise AotError(f"topology {name!r}: {gen_name} is {gen.dims}D, e.g. "
                     f"{gen_name}:{'x'.join(['2'] * gen.dims)}; {_FORMS}")
  chips = math.prod(shape)
  shape3 = tuple(shape) + (1,) * (3 - len(shape))
  if gen.dims == 3:
    host = tuple(min(d, h) for d, h in zip(shape3, (2, 2, 1)))
    wrap = (min(shape3) >= 4,) * 3  # full 4x4x4 cubes and larger are tori
  else:
    host = shape3 if chips <= 8 else (2, 2, 1)  # up to 8 chips sit on one host
    wrap = tuple(d == 16 for d in shape) + (False,)
  cloud_name = f"{gen_name}-{chips * 2 if gen.counts_cores else chips}"
  return Topology(f"{gen.jax_name}:{'x'.join(map(str, shape))}", chips, cloud_name,
                  gen.chip_config, host, wrap, gen.hbm_bytes)


def _require_libtpu() -> None:
  """Fails early with the install command rather than with jax's generic TPU message."""
  if not os.environ.get("TPU_LIBRARY_PATH") and importlib.util.find_spec("libtpu") is None:
    raise AotError("sptlm compile needs libtpu: pip install 'sptlm[tpu-aot]'")


def topology_devices(topo: Topology) -> list[jax.Device]:
  """Compile-only devices of the slice; no TPU needs to be attached."""
  _require_libtpu()
  if os.environ.get("TPU_SKIP_MDS_QUERY") == "1":
    # jax found no TPU chip on this host. libtpu would warn about the metadata server it
    # cannot reach (these name the host, not the compile target), and its lock file, which
    # guards chips that are not here, would stop two compiles (or test workers) at once.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topo.jax_name, chip_config_name=topo.chip_config_name,
        chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=1, wrap=topo.wrap)
  except RuntimeError as e:
    if "not installed" in str(e):
      raise AotError("sptlm compile needs libtpu: pip install 'sptlm[tpu-aot]'") from e
    raise AotError(f"libtpu rejected topology {topo.jax_name}: {str(e).splitlines()[0]}") from e
  return list(desc.devices)


def _with_batch(cfg: Config, per_device_batch: int | None, num_devices: int) -> Config:
  """Sizes the global batch for the target slice, as a run on it would (frozen config)."""
  if per_device_batch is None:
    return cfg
  if per_device_batch < 1:
    raise AotError(f"--per-device-batch={per_device_batch} must be at least 1")
  data = dataclasses.replace(cfg.data, global_batch_size=per_device_batch * num_devices)
  cfg = dataclasses.replace(cfg, data=data)
  config_lib.validate(cfg)
  return cfg


def _cost_flops(compiled: Any) -> float | None:
  """XLA's own FLOP count of the per-device program, where the backend gives one."""
  try:
    cost = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def _peak_flops(device_kind: str) -> float | None:
  """Datasheet peak without touching the device: compile-only devices cannot run a matmul."""
  for kind, peak in sorted(flops_lib.PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if device_kind.startswith(kind):
      return peak
  return None


def compile_for_topology(cfg: Config, topology: str,
                         per_device_batch: int | None = None) -> dict[str, Any]:
  """Compiles the train step for `topology`; returns memory per device, FLOPs and timings."""
  topo = parse_topology(topology)
  devices = topology_devices(topo)
  cfg = _with_batch(cfg, per_device_batch, len(devices))
  mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                             "tensor": cfg.mesh.tensor}, devices)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  global_batch = cfg.data.global_batch_size
  if global_batch % batch_shards:
    raise AotError(f"data.global_batch_size={global_batch} does not divide over the "
                   f"{batch_shards} batch shards (mesh data x fsdp) of {topo.name}; "
                   "use --per-device-batch or change the mesh")

  program = program_lib.build(cfg, mesh)
  start = time.perf_counter()
  lowered = program.step.lower(program.abstract_state, program.abstract_batch())
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    first = str(e).strip().splitlines()[0]
    hint = (" (lower the batch, remat more, or shard over more devices)"
            if "RESOURCE_EXHAUSTED" in first else "")
    raise AotError(f"XLA could not compile {cfg.name} for {topo.name}: {first}{hint}") from e
  seconds = time.perf_counter() - start

  mem = compiled.memory_analysis()
  if mem is None:
    raise AotError(f"the TPU compiler gave no memory analysis for {topo.name}")
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(program.abstract_state["params"])[0]}
  seq_len = cfg.data.seq_len
  step_flops = flops_lib.train_flops_per_step(cfg.model, program.vocab.size, seq_len,
                                              global_batch)
  kind = devices[0].device_kind
  peak = _peak_flops(kind)
  return {
      "config": cfg.name,
      "topology": topo.name,
      "jax_topology": topo.jax_name,
      "device_kind": kind,
      "num_devices": len(devices),
      "mesh": dict(mesh.shape),
      "global_batch": global_batch,
      "seq_len": seq_len,
      "num_params": program.num_params,
      "compile_seconds": seconds,
      "argument_bytes": mem.argument_size_in_bytes,
      "output_bytes": mem.output_size_in_bytes,
      "temp_bytes": mem.temp_size_in_bytes,
      "alias_bytes": mem.alias_size_in_bytes,
      "generated_code_bytes": mem.generated_code_size_in_bytes,
      "total_bytes": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
      "peak_bytes": getattr(mem, "peak_memory_in_bytes", None),
      "hbm_bytes_per_device": topo.hbm_bytes_per_device,
      "flops_per_step": step_flops,
      "flops_per_device": step_flops / len(devices),
      "xla_flops_per_device": _cost_flops(compiled),
      "peak_flops_per_device": peak,
      "unsharded_params": sharding.check_sharded(flat),
  }


def _count(n: int) -> str:
  """Parameter counts as people say them (1.00M, 9.54B)."""
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_report(report: dict[str, Any]) -> str:
  """The report as a small table; memory in GB of 1e9 bytes, per device."""
  r = report
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  per_device = r["global_batch"] / r["num_devices"]

  def gb(key: str) -> str:
    return f"{r[key] / GB:10.3f}"

  hbm = r["hbm_bytes_per_device"]
  lines = [
      f"{r['config']} on {r['topology']} ({r['num_devices']} x {r['device_kind']}, "
      f"topology {r['jax_topology']}), compiled in {r['compile_seconds']:.1f} s",
      f"mesh {mesh}; batch {r['global_batch']} x {r['seq_len']} tokens "
      f"({per_device:g} per device); {_count(r['num_params'])} params",
      "",
      f"{'memory per device':<32}{'GB':>10}",
      f"{'  arguments (state, batch)':<32}{gb('argument_bytes')}",
      f"{'  outputs (new state)':<32}{gb('output_bytes')}",
      f"{'  temporaries':<32}{gb('temp_bytes')}",
      f"{'  aliased (donated state)':<32}{-r['alias_bytes'] / GB:10.3f}",
      f"{'  total':<32}{gb('total_bytes')}   ({100 * r['total_bytes'] / hbm:.0f}% of "
      f"{hbm / GB:.0f} GB HBM)",
      f"{'  generated code':<32}{gb('generated_code_bytes')}",
      "",
      f"{'FLOPs per step (analytic)':<32}{r['flops_per_step']:10.3e}",
      f"{'FLOPs per device (analytic)':<32}{r['flops_per_device']:10.3e}",
  ]
  if r.get("xla_flops_per_device"):
    lines.append(f"{'FLOPs per device (XLA)':<32}{r['xla_flops_per_device']:10.3e}"
                 "   (loop bodies counted once)")
  if r.get("peak_flops_per_device"):
    lines.append(f"{'step time at 100% MFU':<32}"
                 f"{r['flops_per_device'] / r['peak_flops_per_device']:10.3g} s")
  if r.get("unsharded_params"):
    lines.append(f"warning: replicated on every device: {', '.join(r['unsharded_params'][:3])}")
  return "\n".join(lines)
