"""The device mesh and the logical-axis rules, in one place.

The model names only logical axes ("batch", "embed", "heads", ...). The config maps each to
mesh axes (data, fsdp, tensor). `logical_rules(mesh, rules)` makes that mapping current so
`constrain(x, names)` inside the model pins activations; outside it, `constrain` is a no-op,
which is what a plain single-device call wants.
"""

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sptlm.config import MESH_AXES, ConfigError, check_mesh_sizes

Rules = tuple[tuple[str, tuple[str, ...]], ...]

_current = threading.local()


def _keys(sizes: dict[str, int]) -> str:
  """`mesh.data=1 mesh.fsdp=-1 mesh.tensor=1`: the keys to change, as the user wrote them."""
  return " ".join(f"mesh.{a}={sizes[a]}" for a in MESH_AXES)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry to the devices left over; checks the product.

  The device count is known only at run time, so this is the one config check that cannot
  run when the config loads: build the mesh before writing anything to the work directory.
  """
  check_mesh_sizes(sizes)
  shape = [sizes[a] for a in MESH_AXES]
  free = [a for a in MESH_AXES if sizes[a] == -1]
  known = math.prod(s for s in shape if s != -1)
  if free:
    if num_devices % known:
      fixed = [f"mesh.{a}" for a in MESH_AXES if sizes[a] > 1]
      fix = (f"give {fixed[0]} a size that divides {num_devices}" if len(fixed) == 1 else
             f"give {' and '.join(fixed)} sizes whose product divides {num_devices}")
      raise ConfigError(f"{_keys(sizes)}: the fixed sizes ({known} devices) do not divide the "
                        f"{num_devices} devices; {fix}")
    shape[MESH_AXES.index(free[0])] = num_devices // known
  need = math.prod(shape)
  if need != num_devices:
    fits = [a for a in MESH_AXES if num_devices % (need // sizes[a]) == 0]
    fix = (f"set mesh.{fits[0]}=-1 to give it the devices left over" if fits else
           f"give the mesh axes sizes whose product is {num_devices}")
    raise ConfigError(f"{_keys(sizes)} needs {need} devices, {num_devices} are available; "
                      f"{fix}")
  return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with explicitly declared (auto-sharded) axis types."""
  from jax.experimental import mesh_utils
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(sizes, len(devices))
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:  # multislice: only the data axis crosses the slower network between slices
    if shape[0] % slices:
      raise ConfigError(f"mesh.data={shape[0]} must be a multiple of the {slices} slices (only "
                        "the data axis crosses slices); set mesh.data to a multiple of "
                        f"{slices}")
    ici = (shape[0] // slices, *shape[1:])
    grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def spec(names: Sequence[str | None], rules: Rules) -> P:
  """Logical names -> PartitionSpec. Unknown names are an error, so every axis is decided."""
  table = dict(rules)
  out, used = [], set()
  for name in names:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ConfigError(f"logical axis {name!r} has no rule in mesh.rules; add one "
                        f"(e.g. --config.mesh.rules.{name}=None to replicate)")
    axes = tuple(a for a in table[name] if a not in used)  # a mesh axis shards one dim only
    used.update(axes)
    out.append(axes if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


@contextlib.contextmanager
def logical_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes `mesh` and `rules` current for `constrain` (and for the attention backends).

  The rules are read while tracing, and jit's cache does not know them: enter this *inside*
  the function that is jitted (as train.program does), never around a call to a jitted
  function that was traced without it.
  """
  prev = getattr(_current, "value", None)
  _current.value = (mesh, rules)
  try:
    yield
  finally:
    _current.value = prev


def current() -> tuple[Mesh, Rules] | None:
  return getattr(_current, "value", None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by logical names when a mesh is current."""
  ctx = current()
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(names, rules)))


def named(mesh: Mesh, rules: Rules, names: Sequence[str | None]) -> NamedSharding:
  return NamedSharding(mesh, spec(names, rules))


def check_sharded(params: dict[str, jax.Array], min_size: int = 1 << 20) -> list[str]:
  """Names of large arrays left whole on every device although the mesh has >1 device.

  A mapping typo (say `embed` mapped to an axis of size 1) would silently replicate a 9B
  model; the trainer refuses to start when this list is not empty.
  """
  bad = []
  for path, arr in params.items():
    sharding = getattr(arr, "sharding", None)
    if sharding is None or arr.size < min_size or len(sharding.device_set) == 1:
      continue
    if tuple(sharding.shard_shape(arr.shape)) == tuple(arr.shape):
      bad.append(f"{path} {tuple(arr.shape)}")
  return bad
