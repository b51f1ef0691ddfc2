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

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, tuple[str, ...]], ...]

_current = threading.local()


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry to the devices left over; checks the product."""
  shape = [sizes[a] for a in MESH_AXES]
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  known = math.prod(s for s in shape if s != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices do not divide by {known}")
    shape[free[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"{num_devices} are available; set one axis to -1")
  return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with explicitly declared (auto-sharded) axis types."""
  from jax.experimental import mesh_utils
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(sizes, len(devices))
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:  # multislice: only the data axis crosses the slower network between slices
    if shape[0] % slices:
      raise ValueError(f"mesh.data={shape[0]} must be a multiple of the {slices} slices")
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
      raise KeyError(f"logical axis {name!r} has no rule in mesh.rules; add one "
                     f"(e.g. {name}=None to replicate)")
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
