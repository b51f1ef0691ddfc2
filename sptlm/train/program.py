"""Builds what a run compiles: abstract state, its shardings, the init and the train step.

The trainer, `sptlm compile` (ahead of time, for a TPU topology) and the benchmarks all build
the step here, so what is measured and compiled is exactly what trains.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data_pipelines.vocabulary import Vocabulary
from sptlm import sharding
from sptlm.config import Config
from sptlm.model import nnx_compat, transformer
from sptlm.train import optimizer as optimizer_lib
from sptlm.train import step as step_lib

BATCH_FIELDS = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32,
                "positions": jnp.int32, "weights": jnp.float32, "tasks": jnp.int32}


def vocabulary(cfg: Config) -> Vocabulary:
  return Vocabulary.from_config(cfg.vocab)


@dataclasses.dataclass
class Program:
  """Everything about a run's compiled computation, before any array is allocated."""

  cfg: Config
  mesh: Mesh
  vocab: Vocabulary
  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: Any  # ShapeDtypeStructs carrying their shardings
  state_sharding: Any
  batch_sharding: NamedSharding
  init: Callable[[], step_lib.TrainState]
  step: Any  # jitted train step (state, batch) -> (state, metrics)
  num_params: int
  task_names: tuple[str, ...] = ("text",)  # the mixture's tasks: batch["tasks"] 1, 2, ...

  def abstract_batch(self, global_batch: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    b = global_batch or self.cfg.data.global_batch_size
    shape = (b, self.cfg.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=self.batch_sharding)
            for k, dt in BATCH_FIELDS.items()}

  def global_batch(self, local: dict[str, Any]) -> dict[str, jax.Array]:
    """Assembles the global batch from each host's local rows."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, local[k])
            for k in BATCH_FIELDS}


def build(cfg: Config, mesh: Mesh, task_names: Sequence[str] = ("text",)) -> Program:
  """`task_names`: the input's mixture tasks, each reported as loss_task_NAME."""
  vocab = vocabulary(cfg)
  rules = cfg.mesh.rules
  model_cfg, seed = cfg.model, cfg.train.seed

  def make_model() -> transformer.Transformer:
    return transformer.build(model_cfg, vocab.size, seed)

  abstract_model = nnx.eval_shape(make_model)
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  names = nnx_compat.param_names(abstract_params)
  param_sharding = jax.tree.map(lambda n: sharding.named(mesh, rules, n), names,
                                is_leaf=lambda x: isinstance(x, tuple))
  opt = optimizer_lib.make(cfg.train)
  sched = optimizer_lib.schedule(cfg.train)
  pure_params = abstract_params.to_pure_dict()
  abstract_opt = jax.eval_shape(opt.init, pure_params)
  replicated = NamedSharding(mesh, P())
  opt_sharding = optax.tree_map_params(
      opt, lambda _, s: s, abstract_opt, param_sharding,
      transform_non_params=lambda _: replicated)
  state_sharding = {"step": replicated, "params": param_sharding, "opt_state": opt_sharding}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": pure_params,
              "opt_state": abstract_opt}
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)

  def init() -> step_lib.TrainState:
    params = nnx.split(make_model(), nnx.Param)[1].to_pure_dict()
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(params)}

  batch_sharding = sharding.named(mesh, rules, ("batch", "length"))
  train_step = step_lib.make_train_step(graphdef, opt, sched, vocab, cfg.train.microbatches,
                                        num_tasks=len(task_names))

  def step_in_mesh(state, batch):
    with sharding.logical_rules(mesh, rules):
      return train_step(state, batch)

  jitted = jax.jit(step_in_mesh, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)
  init_jit = jax.jit(init, out_shardings=state_sharding)
  num_params = sum(x.size for x in jax.tree.leaves(pure_params))
  return Program(cfg, mesh, vocab, graphdef, opt, sched, abstract_state, state_sharding,
                 batch_sharding, init_jit, jitted, num_params, tuple(task_names))
