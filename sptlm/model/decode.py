"""Batched incremental decoding over the KV cache: prefill, sampling and generation.

Prompts of different lengths are left-padded to a common length P so every row's last prompt
token sits in slot P - 1 and all rows write the same cache slot at each step. Pad slots carry
segment id 0 (never attended to); real tokens carry segment id 1 and positions count from 0 at
each row's first real token, so a padded row computes exactly what it would alone.

Dimension letters as in transformer.py, plus P prompt length and T generated tokens.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sptlm.model.transformer import KVCache, Transformer

# Prompts: a list of token-id sequences, or a [B, P] array (right-padded when lengths are given).
Prompts = Sequence[Sequence[int]] | np.ndarray | jax.Array


class LeftPadded(NamedTuple):
  """Prompts laid out for one `Transformer.decode` call."""

  tokens_BxP: np.ndarray  # pad slots hold token 0 (any valid id; they are never attended to)
  segment_ids_BxP: np.ndarray  # 0 on pad slots, 1 on real tokens
  positions_BxP: np.ndarray  # 0 at each row's first real token
  lengths_B: np.ndarray  # real tokens per row


class GenerateOutput(NamedTuple):
  """What `generate` returns."""

  tokens: jax.Array  # [B, T] int32; pad_id after a row has stopped
  lengths: jax.Array  # [B] int32; tokens generated per row, the stop token included
  logprobs: jax.Array  # [B, T] float32; the model's log-probability of each token (0 on pads)


def left_pad(prompts: Prompts, lengths: Sequence[int] | np.ndarray | None = None) -> LeftPadded:
  """Moves each prompt to the right end of a common-width row so their last tokens align.

  A list of sequences is padded to its longest; a [B, P] array keeps its width P (fix P across
  calls to avoid recompiling) and holds row b's prompt in its first lengths[b] slots.
  """
  if isinstance(prompts, (np.ndarray, jax.Array)):
    array_BxP = np.asarray(prompts)
    if array_BxP.ndim != 2:
      raise ValueError(f"a prompts array must be [B, P], got shape {array_BxP.shape}")
    if array_BxP.shape[0] == 0:
      raise ValueError("prompts is empty: pass at least one prompt")
    b, p = array_BxP.shape
    lengths_B = np.full((b,), p) if lengths is None else np.asarray(lengths).reshape(-1)
    if lengths_B.shape[0] != b:
      raise ValueError(f"lengths has {lengths_B.shape[0]} entries for {b} prompts")
    for i, n in enumerate(lengths_B):
      if n == 0:
        raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS)")
      if not 0 < n <= p:
        raise ValueError(f"lengths[{i}]={n} must be in [1, {p}], the prompts array's width")
  else:
    if lengths is not None:
      raise ValueError("lengths goes with a [B, P] prompts array; a list of prompts has its own")
    rows = [np.asarray(row).reshape(-1) for row in prompts]
    if not rows:
      raise ValueError("prompts is empty: pass at least one prompt")
    for i, row in enumerate(rows):
      if row.size == 0:
        raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS)")
    lengths_B = np.array([row.size for row in rows])
    b, p = len(rows), int(lengths_B.max())
    array_BxP = np.zeros((b, p), np.int64)
    for i, row in enumerate(rows):
      array_BxP[i, :row.size] = row
  if not np.issubdtype(array_BxP.dtype, np.integer):
    raise ValueError(f"prompt token ids must be integers, got dtype {array_BxP.dtype}")
  lengths_B = lengths_B.astype(np.int32)
  # Row b's slot j holds its token (j + n_b) mod P: real tokens land in the last n_b slots.
  slot_BxP = np.arange(p)[None, :]
  real_BxP = slot_BxP >= (p - lengths_B)[:, None]
  tokens_BxP = np.take_along_axis(array_BxP, (slot_BxP + lengths_B[:, None]) % p, axis=1)
  return LeftPadded(
      tokens_BxP=np.where(real_BxP, tokens_BxP, 0).astype(np.int32),
      segment_ids_BxP=real_BxP.astype(np.int32),
      positions_BxP=np.maximum(slot_BxP - (p - lengths_B)[:, None], 0).astype(np.int32),
      lengths_B=lengths_B,
  )


def _check_vocab(padded: LeftPadded, vocab_size: int) -> None:
  """Out-of-range ids would be silently clamped or turned into NaN embeddings by jnp.take."""
  real_BxP = padded.segment_ids_BxP == 1
  bad_BxP = real_BxP & ((padded.tokens_BxP < 0) | (padded.tokens_BxP >= vocab_size))
  if bad_BxP.any():
    i, j = np.argwhere(bad_BxP)[0]
    raise ValueError(f"prompt {i} has token id {padded.tokens_BxP[i, j]} outside the "
                     f"vocabulary [0, {vocab_size})")


def _prefill(model: Transformer, tokens_BxP: jax.Array, segment_ids_BxP: jax.Array,
             positions_BxP: jax.Array, max_len: int) -> tuple[KVCache, jax.Array]:
  """One decode call over the left-padded prompts; slot P - 1 holds every row's last token."""
  cache = model.init_cache(tokens_BxP.shape[0], max_len)
  logits_BxPxV, cache = model.decode(tokens_BxP, positions_BxP, segment_ids_BxP, cache)
  return cache, logits_BxPxV[:, -1]


@functools.partial(jax.jit, static_argnames=("max_len",))
def _prefill_jit(graphdef: nnx.GraphDef, state: nnx.State, tokens_BxP: jax.Array,
                 segment_ids_BxP: jax.Array, positions_BxP: jax.Array, *,
                 max_len: int) -> tuple[KVCache, jax.Array]:
  return _prefill(nnx.merge(graphdef, state), tokens_BxP, segment_ids_BxP, positions_BxP,
                  max_len)


def prefill(model: Transformer, prompts: Prompts, max_len: int, *,
            lengths: Sequence[int] | np.ndarray | None = None
            ) -> tuple[KVCache, jax.Array, jax.Array]:
  """Fills a `max_len`-slot cache with the prompts so decoding can continue one token a step.

  Returns the cache, the logits after each row's last prompt token [B, V], and each row's next
  position [B] (its prompt length); the next token goes in slot `cache.index` for every row.
  """
  padded = left_pad(prompts, lengths)
  _check_vocab(padded, model.vocab_size)
  p = padded.tokens_BxP.shape[1]
  if p > max_len:
    raise ValueError(f"prompt length {p} exceeds max_len={max_len}; raise max_len or shorten "
                     "the prompts")
  graphdef, state = nnx.split(model)
  cache, last_logits_BxV = _prefill_jit(graphdef, state, padded.tokens_BxP,
                                        padded.segment_ids_BxP, padded.positions_BxP,
                                        max_len=max_len)
  return cache, last_logits_BxV, jnp.asarray(padded.lengths_B)


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, temperature: float | jax.Array = 0.0,
                  top_p: float | jax.Array = 1.0) -> jax.Array:
  """Next tokens [B]: argmax at temperature 0, else a draw from the tempered top-p nucleus."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  top_p = jnp.asarray(top_p, jnp.float32)

  def greedy() -> jax.Array:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def sample() -> jax.Array:
    scaled_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
    sorted_BxV = jnp.flip(jnp.sort(scaled_BxV, axis=-1), axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    # The nucleus: the most likely tokens until their mass reaches top_p (the first always).
    cutoff_B = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1)
    cutoff_B = jnp.where(top_p >= 1.0, -jnp.inf, cutoff_B)  # no rounding loss of the tail
    nucleus_BxV = jnp.where(scaled_BxV >= cutoff_B[:, None], scaled_BxV, -jnp.inf)
    return jax.random.categorical(rng, nucleus_BxV, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, sample, greedy)


class _Loop(NamedTuple):
  """The decode loop's carry."""

  step: jax.Array  # the next token index to emit
  last_B: jax.Array  # the token emitted at step - 1, fed to the model next
  done_B: jax.Array
  tokens_BxT: jax.Array
  logprobs_BxT: jax.Array
  lengths_B: jax.Array
  cache: KVCache
  rng: jax.Array
  # The model's arrays ride in the carry: closed over, XLA CPU re-slices the stacked layer
  # weights every step (a decode step at batch 1 took 2.4 ms instead of 1.6).
  state: nnx.State


@functools.partial(jax.jit, static_argnames=("max_len", "max_new_tokens", "per_row"))
def _generate_jit(graphdef: nnx.GraphDef, state: nnx.State, tokens_BxP: jax.Array,
                  segment_ids_BxP: jax.Array, positions_BxP: jax.Array, rng: jax.Array,
                  temperature: jax.Array, top_p: jax.Array, stop_tokens_S: jax.Array,
                  pad_id: jax.Array, row_seeds_B: jax.Array, max_new_B: jax.Array, *,
                  max_len: int, max_new_tokens: int, per_row: bool) -> GenerateOutput:
  """Prefill and the whole decode loop as one program, so a step costs no Python."""
  model = nnx.merge(graphdef, state)
  b = tokens_BxP.shape[0]
  cache, logits_BxV = _prefill(model, tokens_BxP, segment_ids_BxP, positions_BxP, max_len)
  start_B = positions_BxP[:, -1] + 1  # position of the first generated token
  row_keys_B = jax.vmap(lambda s: jax.random.fold_in(rng, s))(row_seeds_B)

  def draw(logits_BxV: jax.Array, loop: _Loop) -> tuple[jax.Array, jax.Array]:
    if not per_row:  # one stream for the batch
      rng, key = jax.random.split(loop.rng)
      return sample_logits(logits_BxV, key, temperature, top_p), rng
    # each row its own stream: a row's tokens do not depend on the rest of the batch
    keys_B = jax.vmap(lambda k: jax.random.fold_in(k, loop.step))(row_keys_B)
    token_B = jax.vmap(lambda lg, k: sample_logits(lg[None], k, temperature, top_p)[0])(
        logits_BxV, keys_B)
    return token_B, loop.rng

  def emit(loop: _Loop, logits_BxV: jax.Array) -> _Loop:
    token_B, rng = draw(logits_BxV, loop)
    logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV.astype(jnp.float32)),
                                    token_B[:, None], axis=-1)[:, 0]
    live_B = ~loop.done_B
    return loop._replace(
        step=loop.step + 1,
        last_B=token_B,
        done_B=(loop.done_B | (token_B[:, None] == stop_tokens_S[None, :]).any(axis=-1)
                | (loop.lengths_B + live_B.astype(jnp.int32) >= max_new_B)),
        tokens_BxT=loop.tokens_BxT.at[:, loop.step].set(jnp.where(live_B, token_B, pad_id)),
        logprobs_BxT=loop.logprobs_BxT.at[:, loop.step].set(jnp.where(live_B, logprob_B, 0.0)),
        lengths_B=loop.lengths_B + live_B.astype(jnp.int32),
        rng=rng,
    )

  def body(loop: _Loop) -> _Loop:
    positions_Bx1 = (start_B + loop.step - 1)[:, None]
    logits_Bx1xV, cache = nnx.merge(graphdef, loop.state).decode(
        loop.last_B[:, None], positions_Bx1, jnp.ones((b, 1), jnp.int32), loop.cache)
    return emit(loop._replace(cache=cache), logits_Bx1xV[:, 0])

  def cond(loop: _Loop) -> jax.Array:
    return (loop.step < max_new_tokens) & ~jnp.all(loop.done_B)

  loop = _Loop(
      step=jnp.zeros((), jnp.int32),
      last_B=jnp.zeros((b,), jnp.int32),
      done_B=jnp.zeros((b,), bool),
      tokens_BxT=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
      logprobs_BxT=jnp.zeros((b, max_new_tokens), jnp.float32),
      lengths_B=jnp.zeros((b,), jnp.int32),
      cache=cache,
      rng=rng,
      state=state,
  )
  loop = jax.lax.while_loop(cond, body, emit(loop, logits_BxV))
  return GenerateOutput(tokens=loop.tokens_BxT, lengths=loop.lengths_B,
                        logprobs=loop.logprobs_BxT)


def generate(model: Transformer, prompts: Prompts, *, max_new_tokens: int, rng: jax.Array,
             temperature: float = 0.0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
             pad_id: int = 0, lengths: Sequence[int] | np.ndarray | None = None,
             max_len: int | None = None, row_seeds: Sequence[int] | np.ndarray | None = None,
             row_max_new_tokens: Sequence[int] | np.ndarray | None = None,
             batch_sharding: jax.sharding.Sharding | None = None) -> GenerateOutput:
  """Continues each prompt by up to `max_new_tokens` tokens, one jitted loop for the batch.

  A row stops after emitting any of `stop_tokens`, or `row_max_new_tokens[b]` tokens; the loop
  ends once every row has stopped. `max_len` sizes the cache (default: prompt length +
  max_new_tokens). With `row_seeds`, row b samples from its own stream (rng folded with its
  seed and the step), so its tokens are the same whatever else is in the batch. With
  `batch_sharding` the rows are split over its devices (the model's arrays must be replicated
  over them). Temperature, top_p, pad_id, the rng, the seeds, the row limits and the stop
  tokens are traced, so changing them does not recompile.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 decodes greedily)")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1 disables nucleus sampling)")
  vocab = model.vocab_size
  for t in stop_tokens:
    if not 0 <= t < vocab:
      raise ValueError(f"stop token {t} is outside the vocabulary [0, {vocab})")
  padded = left_pad(prompts, lengths)
  _check_vocab(padded, vocab)
  p = padded.tokens_BxP.shape[1]
  max_len = p + max_new_tokens if max_len is None else max_len
  if p + max_new_tokens > max_len:
    raise ValueError(f"prompt length {p} + max_new_tokens {max_new_tokens} exceeds "
                     f"max_len={max_len}; raise max_len or generate fewer tokens")
  # Pad the stop set to a multiple of 8 with -1 (never sampled) so its size rarely recompiles.
  stop_S = np.full((-(-max(len(stop_tokens), 1) // 8) * 8,), -1, np.int32)
  stop_S[:len(stop_tokens)] = stop_tokens
  b = padded.tokens_BxP.shape[0]
  seeds_B = np.zeros((b,), np.uint32) if row_seeds is None else np.asarray(
      row_seeds, np.uint32).reshape(b)
  limit_B = np.full((b,), max_new_tokens, np.int32) if row_max_new_tokens is None else (
      np.minimum(np.asarray(row_max_new_tokens, np.int32).reshape(b), max_new_tokens))
  rows = (padded.tokens_BxP, padded.segment_ids_BxP, padded.positions_BxP, seeds_B, limit_B)
  if batch_sharding is not None:
    rows = tuple(jax.device_put(x, batch_sharding if x.ndim == 2 else
                                jax.sharding.NamedSharding(batch_sharding.mesh,
                                                           jax.sharding.PartitionSpec(
                                                               batch_sharding.spec[0])))
                 for x in rows)
  tokens_BxP, segment_ids_BxP, positions_BxP, seeds_B, limit_B = rows
  graphdef, state = nnx.split(model)
  return _generate_jit(graphdef, state, tokens_BxP, segment_ids_BxP, positions_BxP, rng,
                       jnp.float32(temperature), jnp.float32(top_p), stop_S,
                       jnp.int32(pad_id), seeds_B, limit_B, max_len=max_len,
                       max_new_tokens=max_new_tokens, per_row=row_seeds is not None)
