"""The loss and the jitted train step (pjit semantics: explicit shardings, donated state)."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from data_pipelines.vocabulary import Vocabulary

Batch = dict[str, jax.Array]
TrainState = dict[str, Any]  # {"step": int32 scalar, "params": pure dict, "opt_state": ...}


def cross_entropy(model: Any, x_BxLxD: jax.Array, targets_BxL: jax.Array,
                  chunk: int) -> jax.Array:
  """Per-token cross-entropy of the final hidden states.

  With `chunk` > 0 the sequence goes in blocks of that size under `jax.checkpoint`, so neither
  pass holds more than one [B, chunk, V] block of float32 logits (5.5 GB for 8k x 168k whole).
  """
  def xent(x_BxCxD: jax.Array, t_BxC: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model.logits(x_BxCxD), t_BxC)

  b, l = targets_BxL.shape
  if not chunk or chunk >= l:
    return xent(x_BxLxD, targets_BxL)
  n = l // chunk

  def split(a: jax.Array) -> jax.Array:  # [B, L, ...] -> [n, B, C, ...]
    return jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)

  xent_NxBxC = jax.lax.map(lambda a: jax.checkpoint(xent)(*a),
                           (split(x_BxLxD), split(targets_BxL)))
  return jnp.moveaxis(xent_NxBxC, 0, 1).reshape(b, l)


def loss_sums(params: Any, graphdef: nnx.GraphDef, batch: Batch, vocab: Vocabulary,
              scale: jax.Array | float = 1.0,
              num_tasks: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted cross-entropy *sums* (not means), so micro-batches add up exactly.

  The differentiated value is the sum times `scale` (1 / the global batch's weight), so the
  gradients come out normalised without another pass over them. Per mixture task
  (batch["tasks"], 1-based): [num_tasks] sums.
  """
  model = nnx.merge(graphdef, params)
  x_BxLxD = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
  xent_BxL = cross_entropy(model, x_BxLxD, batch["targets"], model.cfg.loss_chunk)
  w_BxL = batch["weights"].astype(jnp.float32)
  speech_BxL = vocab.is_speech(batch["targets"]).astype(jnp.float32) * w_BxL
  text_BxL = w_BxL - speech_BxL
  sums = {
      "loss": jnp.sum(xent_BxL * w_BxL),
      "weight": jnp.sum(w_BxL),
      "loss_speech": jnp.sum(xent_BxL * speech_BxL),
      "weight_speech": jnp.sum(speech_BxL),
      "loss_text": jnp.sum(xent_BxL * text_BxL),
      "weight_text": jnp.sum(text_BxL),
  }
  task_BxLxT = (batch["tasks"][..., None] == jnp.arange(1, num_tasks + 1)).astype(jnp.float32)
  sums["loss_tasks"] = jnp.einsum("bl,blt->t", xent_BxL * w_BxL, task_BxLxT)
  sums["weight_tasks"] = jnp.einsum("bl,blt->t", w_BxL, task_BxLxT)
  return sums["loss"] * scale, sums


def _split_micro(batch: Batch, n: int) -> Batch:
  return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, vocab: Vocabulary, microbatches: int,
                    num_tasks: int = 1) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """One optimizer step over a global batch, accumulating gradients over micro-batches."""
  grad_fn = jax.value_and_grad(functools.partial(loss_sums, num_tasks=num_tasks), has_aux=True)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    params = state["params"]
    denom = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
    if microbatches == 1:
      (_, sums), grads = grad_fn(params, graphdef, batch, vocab, 1.0 / denom)
    else:
      def micro(carry, mb):
        (_, s), g = grad_fn(params, graphdef, mb, vocab, 1.0 / denom)
        return jax.tree.map(jnp.add, carry, (s, g)), None

      zero = (jax.eval_shape(lambda: loss_sums(params, graphdef, jax.tree.map(
          lambda x: x[: x.shape[0] // microbatches], batch), vocab, num_tasks=num_tasks)[1]),
              jax.tree.map(jnp.zeros_like, params))
      zero = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero[0]), zero[1])
      (sums, grads), _ = jax.lax.scan(micro, zero, _split_micro(batch, microbatches))
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    metrics = {
        "loss": sums["loss"] / denom,
        "loss_text": jnp.where(sums["weight_text"] > 0,
                               sums["loss_text"] / jnp.maximum(sums["weight_text"], 1), jnp.nan),
        "loss_speech": jnp.where(sums["weight_speech"] > 0,
                                 sums["loss_speech"] / jnp.maximum(sums["weight_speech"], 1),
                                 jnp.nan),
        "loss_tasks": jnp.where(sums["weight_tasks"] > 0,
                                sums["loss_tasks"] / jnp.maximum(sums["weight_tasks"], 1),
                                jnp.nan),
        "grad_norm": grad_norm,
        "lr": schedule(state["step"]),
        "tokens": jnp.sum(batch["segment_ids"] > 0),  # real tokens: padding has segment 0
    }
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new_state, metrics

  return train_step
