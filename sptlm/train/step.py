"""The loss and the jitted train step (pjit semantics: explicit shardings, donated state)."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from data_pipelines.vocabulary import Vocabulary

Batch = dict[str, jax.Array]
TrainState = dict[str, Any]  # {"step": int32 scalar, "params": pure dict, "opt_state": ...}


def loss_sums(params: Any, graphdef: nnx.GraphDef, batch: Batch,
              vocab: Vocabulary) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted cross-entropy *sums* (not means), so micro-batches add up exactly."""
  model = nnx.merge(graphdef, params)
  logits_BxLxV = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  xent_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
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
  return sums["loss"], sums


def _split_micro(batch: Batch, n: int) -> Batch:
  return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, vocab: Vocabulary,
                    microbatches: int) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """One optimizer step over a global batch, accumulating gradients over micro-batches."""
  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    params = state["params"]
    if microbatches == 1:
      (_, sums), grads = grad_fn(params, graphdef, batch, vocab)
    else:
      def micro(carry, mb):
        (_, s), g = grad_fn(params, graphdef, mb, vocab)
        return jax.tree.map(jnp.add, carry, (s, g)), None

      zero = (jax.eval_shape(lambda: loss_sums(params, graphdef, jax.tree.map(
          lambda x: x[: x.shape[0] // microbatches], batch), vocab)[1]),
              jax.tree.map(jnp.zeros_like, params))
      zero = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero[0]), zero[1])
      (sums, grads), _ = jax.lax.scan(micro, zero, _split_micro(batch, microbatches))
    denom = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
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
        "grad_norm": grad_norm,
        "lr": schedule(state["step"]),
        "tokens": sums["weight"],
    }
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new_state, metrics

  return train_step
