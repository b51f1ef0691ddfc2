"""AdamW with warmup, linear or cosine decay to a floor, and global-norm clipping."""

import jax
import jax.numpy as jnp
import optax

from sptlm.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to the peak, then decay to min_learning_rate at the plan's last step
  (train.schedule_steps, or train.steps when 0) and hold it there: a run extended past its
  plan keeps the learning rates of the steps already planned."""
  plan = cfg.schedule_steps or cfg.steps
  warmup_steps = min(cfg.warmup_steps, plan - 1)
  decay_steps = plan - warmup_steps
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps,
                                        alpha=cfg.min_learning_rate / cfg.learning_rate)
  else:
    decay = optax.linear_schedule(cfg.learning_rate, cfg.min_learning_rate, decay_steps)
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def _decay_mask(params):
  """Weight decay on weight matrices only: norm scales and biases stay undecayed."""

  def decayed(path, _) -> bool:
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name == "scale" or name.endswith("bias"))

  return jax.tree_util.tree_map_with_path(decayed, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Like optax's, but one scalar multiply: no second copy of every gradient (~4% at 150M)."""

  def update(updates, state, params=None):
    del params
    norm = optax.global_norm(updates)
    factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=_decay_mask),
  )
