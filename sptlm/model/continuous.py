"""Continuous batching: a fixed set of decode slots; a row that stops frees its slot for the
next prompt while the other rows go on.

`generate` (decode.py) runs a static batch until its longest row stops, so rows that stop early
sit idle. Here the host keeps a queue: it prefills waiting prompts into free slots (one jitted
`_admit`: prefill of up to R prompts + scatter into the slots' cache rows, each row writing its
own slot index), then runs `_steps` (a jitted while loop) until enough rows have stopped or
`chunk_steps` steps have passed, and collects the stopped rows. Python runs per chunk, never
per token. Each prompt samples from its own stream (rng folded with its seed, then with its
token count), exactly as `generate(..., row_seeds=...)` does, so a prompt's tokens do not
depend on the slot count, the order of the prompts or their neighbours.

Compiles: `_steps` once per (slots, cache length bucket); `_admit` once per (admitted-rows
bucket, prompt width bucket): R is rounded up to a power of two, the width to `prompt_bucket`,
the cache length and token buffer to a multiple of 64.
"""

import collections
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sptlm.model import decode
from sptlm.model.transformer import KVCache, Transformer


_LEN_BUCKET = 64  # the token buffer and the cache length are rounded up to a multiple of this


class _Slots(NamedTuple):
  """Device state of the slots, carried between chunks."""

  cache: KVCache  # index is per row
  last_B: jax.Array  # the token each row emitted last (fed next)
  position_B: jax.Array  # the position of that token
  count_B: jax.Array  # tokens emitted by the row's current prompt
  limit_B: jax.Array
  key_B: jax.Array  # each row's sampling stream
  done_B: jax.Array  # stopped (or never filled)
  tokens_BxT: jax.Array


def _draw(logits_BxV: jax.Array, key_B: jax.Array, count_B: jax.Array, temperature: jax.Array,
          top_p: jax.Array) -> jax.Array:
  """Each row's next token, from its own stream at its own step (as decode.generate draws)."""
  keys_B = jax.vmap(jax.random.fold_in)(key_B, count_B)
  return jax.vmap(lambda lg, k: decode.sample_logits(lg[None], k, temperature, top_p)[0])(
      logits_BxV, keys_B)


def _record(slots: _Slots, token_B: jax.Array, live_B: jax.Array, stop_S: jax.Array) -> _Slots:
  """Writes each live row's token at its count and stops rows at a stop token or their limit."""
  b = token_B.shape[0]
  t = slots.tokens_BxT.shape[1]
  col_B = jnp.where(live_B, slots.count_B, t)  # out of range: dropped
  tokens_BxT = slots.tokens_BxT.at[jnp.arange(b), col_B].set(token_B, mode="drop")
  count_B = slots.count_B + live_B.astype(jnp.int32)
  stopped_B = (token_B[:, None] == stop_S[None, :]).any(-1) | (count_B >= slots.limit_B)
  return slots._replace(last_B=jnp.where(live_B, token_B, slots.last_B), count_B=count_B,
                        done_B=slots.done_B | (live_B & stopped_B), tokens_BxT=tokens_BxT)


@functools.partial(jax.jit, donate_argnums=(2,))
def _admit(graphdef: nnx.GraphDef, state: nnx.State, slots: _Slots, tokens_RxP: jax.Array,
           segment_ids_RxP: jax.Array, positions_RxP: jax.Array, slot_R: jax.Array,
           key_R: jax.Array, limit_R: jax.Array, rng: jax.Array, temperature: jax.Array,
           top_p: jax.Array, stop_S: jax.Array, pad_id: jax.Array) -> _Slots:
  """Prefills R prompts and places them in slots slot_R (rows with slot_R = B are padding)."""
  model = nnx.merge(graphdef, state)
  r, p = tokens_RxP.shape
  new_cache, logits_RxV = decode._prefill(model, tokens_RxP, segment_ids_RxP, positions_RxP, p)
  key_R = jax.vmap(lambda s: jax.random.fold_in(rng, s))(key_R)
  token_R = _draw(logits_RxV, key_R, jnp.zeros((r,), jnp.int32), temperature, top_p)
  c = slots.cache
  s = c.segment_ids_BxS.shape[1]

  def put(rows_BxKxSxDh: jax.Array, new_RxKxPxDh: jax.Array) -> jax.Array:
    full_RxKxSxDh = jnp.zeros((r,) + rows_BxKxSxDh.shape[1:], rows_BxKxSxDh.dtype)
    full_RxKxSxDh = full_RxKxSxDh.at[:, :, :p].set(new_RxKxPxDh)
    return rows_BxKxSxDh.at[slot_R].set(full_RxKxSxDh, mode="drop")

  seg_RxS = jnp.zeros((r, s), jnp.int32).at[:, :p].set(segment_ids_RxP)
  cache = KVCache(tuple(put(a, n) for a, n in zip(c.k, new_cache.k)),
                  tuple(put(a, n) for a, n in zip(c.v, new_cache.v)),
                  c.segment_ids_BxS.at[slot_R].set(seg_RxS, mode="drop"),
                  c.index.at[slot_R].set(p, mode="drop"))
  t = slots.tokens_BxT.shape[1]
  slots = slots._replace(
      cache=cache,
      position_B=slots.position_B.at[slot_R].set(positions_RxP[:, -1] + 1, mode="drop"),
      count_B=slots.count_B.at[slot_R].set(0, mode="drop"),
      limit_B=slots.limit_B.at[slot_R].set(limit_R, mode="drop"),
      key_B=slots.key_B.at[slot_R].set(key_R, mode="drop"),
      done_B=slots.done_B.at[slot_R].set(False, mode="drop"),
      tokens_BxT=slots.tokens_BxT.at[slot_R].set(jnp.full((r, t), pad_id, jnp.int32),
                                                 mode="drop"))
  b = slots.done_B.shape[0]
  token_B = jnp.zeros((b,), jnp.int32).at[slot_R].set(token_R, mode="drop")
  new_B = jnp.zeros((b,), bool).at[slot_R].set(True, mode="drop")
  return _record(slots, token_B, new_B, stop_S)


@functools.partial(jax.jit, static_argnames=("chunk_steps",), donate_argnums=(2,))
def _steps(graphdef: nnx.GraphDef, state: nnx.State, slots: _Slots, want_free: jax.Array,
           temperature: jax.Array, top_p: jax.Array, stop_S: jax.Array, pad_id: jax.Array, *,
           chunk_steps: int) -> _Slots:
  """Decodes every live row until `want_free` slots are stopped or empty, or chunk_steps pass."""
  del pad_id  # (one argument list for both jitted calls)
  b = slots.done_B.shape[0]

  def body(carry: tuple[jax.Array, _Slots, nnx.State]) -> tuple[jax.Array, _Slots, nnx.State]:
    i, slots, state = carry  # the weights ride in the carry (see decode._Loop.state)
    position_B = slots.position_B
    logits_Bx1xV, cache = nnx.merge(graphdef, state).decode(
        slots.last_B[:, None], position_B[:, None], jnp.ones((b, 1), jnp.int32), slots.cache)
    live_B = ~slots.done_B
    token_B = _draw(logits_Bx1xV[:, 0], slots.key_B, slots.count_B, temperature, top_p)
    # an idle row's slot index stays put, so it never runs past the cache
    cache = cache._replace(index=jnp.where(live_B, cache.index, slots.cache.index))
    slots = slots._replace(cache=cache, position_B=position_B + live_B.astype(jnp.int32))
    return i + 1, _record(slots, token_B, live_B, stop_S), state

  def cond(carry: tuple[jax.Array, _Slots, nnx.State]) -> jax.Array:
    i, slots, _ = carry
    stopped = jnp.sum(slots.done_B.astype(jnp.int32))
    return (i < chunk_steps) & (stopped < want_free) & ~jnp.all(slots.done_B)

  return jax.lax.while_loop(cond, body, (jnp.int32(0), slots, state))[1]


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, slots: int,
             max_new_tokens: Sequence[int], rng: jax.Array, temperature: float = 0.0,
             top_p: float = 1.0, stop_tokens: Sequence[int] = (), pad_id: int = 0,
             row_seeds: Sequence[int], prompt_bucket: int = 32, chunk_steps: int = 64,
             refill_at: int | None = None,
             batch_sharding: jax.sharding.NamedSharding | None = None) -> list[np.ndarray]:
  """Continues each prompt by up to max_new_tokens[i] tokens (stop token included) in `slots`
  decode slots; returns each prompt's tokens, in input order.

  The same tokens as `decode.generate(..., row_seeds=row_seeds)` gives each prompt (up to the
  float rounding of different batch shapes). `refill_at`: how many stopped rows make the host
  refill (default slots // 8, at least 1; refilling costs a prefill call). With
  `batch_sharding` the slots are split over its devices (the model replicated over them).
  """
  n = len(prompts)
  if n == 0:
    return []
  if len(max_new_tokens) != n or len(row_seeds) != n:
    raise ValueError("max_new_tokens and row_seeds need one entry per prompt")
  if temperature < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
  widths = [-(-len(p) // prompt_bucket) * prompt_bucket for p in prompts]
  t = -(-int(max(max_new_tokens)) // _LEN_BUCKET) * _LEN_BUCKET  # few distinct shapes: few
  max_len = -(-(max(widths) + t) // _LEN_BUCKET) * _LEN_BUCKET  # compilations
  stop_S = np.full((-(-max(len(stop_tokens), 1) // 8) * 8,), -1, np.int32)
  stop_S[:len(stop_tokens)] = stop_tokens
  graphdef, state = nnx.split(model)
  cache = model.init_cache(slots, max_len)
  dev = _Slots(cache=cache._replace(index=jnp.zeros((slots,), jnp.int32)),
               last_B=jnp.zeros((slots,), jnp.int32), position_B=jnp.zeros((slots,), jnp.int32),
               count_B=jnp.zeros((slots,), jnp.int32), limit_B=jnp.ones((slots,), jnp.int32),
               key_B=jnp.zeros((slots,) + rng.shape, rng.dtype), done_B=jnp.ones((slots,), bool),
               tokens_BxT=jnp.full((slots, t), pad_id, jnp.int32))
  if batch_sharding is not None:
    rows = jax.sharding.NamedSharding(batch_sharding.mesh,
                                      jax.sharding.PartitionSpec(batch_sharding.spec[0]))
    dev = jax.tree.map(lambda x: jax.device_put(x, rows) if x.ndim and x.shape[0] == slots
                       else x, dev)
  scalars = (jnp.float32(temperature), jnp.float32(top_p), jnp.asarray(stop_S),
             jnp.int32(pad_id))
  queue = collections.deque(range(n))
  owner: list[int | None] = [None] * slots  # which prompt each slot holds
  out: list[np.ndarray | None] = [None] * n
  refill_at = refill_at or max(1, slots // 8)
  while queue or any(o is not None for o in owner):
    free = [b for b in range(slots) if owner[b] is None]
    by_width: dict[int, list[int]] = collections.defaultdict(list)
    for b in free:  # admit waiting prompts, grouped by width bucket
      if not queue:
        break
      i = queue.popleft()
      owner[b] = i
      by_width[widths[i]].append(b)
    for width, group in by_width.items():
      dev = _admit_group(graphdef, state, dev, [prompts[owner[b]] for b in group], group, width,
                         [row_seeds[owner[b]] for b in group],
                         [max_new_tokens[owner[b]] for b in group], slots, rng, scalars)
    busy = sum(o is not None for o in owner)
    target = min(slots, slots - busy + refill_at) if queue else slots
    dev = _steps(graphdef, state, dev, jnp.int32(target), *scalars, chunk_steps=chunk_steps)
    done_B, count_B = np.asarray(dev.done_B), np.asarray(dev.count_B)
    finished = [b for b in range(slots) if owner[b] is not None and done_B[b]]
    if finished:
      tokens_BxT = np.asarray(dev.tokens_BxT)
      for b in finished:
        out[owner[b]] = tokens_BxT[b, :count_B[b]].copy()
        owner[b] = None
  return out  # type: ignore[return-value]


def _admit_group(graphdef: nnx.GraphDef, state: nnx.State, dev: _Slots,
                 prompts: list[Sequence[int]], slot_ids: list[int], width: int,
                 seeds: list[int], limits: list[int], slots: int, rng: jax.Array,
                 scalars: tuple) -> _Slots:
  """Pads the group to a power-of-two row count and the width bucket, and admits it."""
  r = 1 << (len(prompts) - 1).bit_length()
  arr = np.zeros((r, width), np.int32)
  lengths = np.ones((r,), np.int32)
  for j, p in enumerate(prompts):
    arr[j, :len(p)] = p
    lengths[j] = len(p)
  padded = decode.left_pad(arr, lengths)
  slot_R = np.full((r,), slots, np.int32)  # padding rows: out of range, dropped
  slot_R[:len(slot_ids)] = slot_ids
  seed_R = np.zeros((r,), np.uint32)
  seed_R[:len(seeds)] = seeds
  limit_R = np.ones((r,), np.int32)
  limit_R[:len(limits)] = limits
  return _admit(graphdef, state, dev, padded.tokens_BxP, padded.segment_ids_BxP,
                padded.positions_BxP, slot_R, seed_R, limit_R, rng, *scalars)
