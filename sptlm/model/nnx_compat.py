"""Everything that depends on Flax NNX's version-specific names lives here.

Flax moved the sharding metadata key (`sharding` -> `out_sharding`) and added eager sharding
in 0.11/0.12; the rest of sptlm calls these helpers instead of touching those names.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

# Parameters get their shardings from the jitted init's out_shardings, not eagerly at creation.
nnx.use_eager_sharding(False)

SHARDING_KEY = "out_sharding"
LAYER_AXIS = "layers"


def init(fn: Callable[..., jax.Array], names: Sequence[str | None]) -> Callable[..., jax.Array]:
  """An initializer whose parameter carries logical axis names."""
  return nnx.with_partitioning(fn, tuple(names))


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
  """`num` copies of a module with parameters stacked on a leading "layers" axis (for scan)."""

  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
  def build(r: nnx.Rngs) -> nnx.Module:
    return make(r)

  return build(rngs.fork(split=num))


def logical_names(state: nnx.State) -> Any:
  """The logical axis names of every variable in `state` (a pytree of tuples)."""

  def names(v: nnx.Variable) -> tuple[str | None, ...]:
    meta = v.get_metadata()
    got = meta.get(SHARDING_KEY)
    return tuple(got) if got is not None else (None,) * v.value.ndim

  return jax.tree.map(names, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def flat_paths(state: nnx.State) -> dict[str, Any]:
  """`{"layers/attn/q/kernel": leaf, ...}`: readable names for reports and converters."""
  return {"/".join(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def param_names(params_state: nnx.State) -> dict[str, Any]:
  """Logical axis names as a nested pure dict shaped like `params_state.to_pure_dict()`."""
  out: dict[str, Any] = {}
  for path, var in nnx.to_flat_state(params_state):
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    got = var.get_metadata().get(SHARDING_KEY)
    node[path[-1]] = tuple(got) if got is not None else (None,) * len(var.value.shape)
  return out
