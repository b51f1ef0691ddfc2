"""Is there a framework tax? sptlm's real train step against a hand-written JAX step.

For each config, in one process: sptlm's step exactly as the trainer builds it
(`program.build` on a one-device mesh), and a minimal train step of the same shape and math
written as plain functions over a dict of stacked arrays (no Flax, no optax: RMSNorm, rotary,
GQA attention with a causal + segment mask, SwiGLU, the config's head tying, remat policy and
scan, weighted cross-entropy, AdamW with global-norm clipping). Both are jitted with donated
state and timed interleaved, so both see the same machine load. Besides wall-clock tokens/s and
MFU it prints XLA's static cost estimate of both compiled steps and their process CPU time per
step: on a shared machine those two move far less than wall time does.

  JAX_PLATFORMS=cpu python benchmarks/train_step.py --configs tiny,lm_150m

lm_150m keeps its model shape but runs a CPU-sized batch (2 x 256) in float32.

Legend: B batch, L length, D model, H query heads, K kv heads, G = H / K, Dh head dim,
F ffn, V vocab, N layers.
"""

import argparse
import math
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sptlm import config as config_lib
from sptlm import sharding
from sptlm.config import Config
from sptlm.model.transformer import REMAT_POLICIES
from sptlm.train import flops as flops_lib
from sptlm.train import program as program_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Config file, overrides that shrink it to this CPU, timed steps per repeat, repeats.
SHAPES: dict[str, tuple[str, list[str], int, int]] = {
    "tiny": ("configs/tiny.py", [], 4, 7),
    "lm_150m": ("configs/lm_150m.py", ["--config.data.global_batch_size=2",
                                       "--config.data.seq_len=256",
                                       "--config.model.dtype=float32"], 1, 3),
}
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
Params = dict[str, Any]
State = dict[str, Any]


# ---- The minimal train step ------------------------------------------------------------------

def init_params(cfg: Config, vocab_size: int, seed: int) -> Params:
  """Normal(init_std) matrices and unit norm scales, layers stacked on a leading axis."""
  m = cfg.model
  n, d, h, k, dh, f = m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff
  pdt = jnp.dtype(m.param_dtype)
  shapes = {"q": (n, d, h, dh), "k": (n, d, k, dh), "v": (n, d, k, dh), "o": (n, h, dh, d),
            "gate": (n, d, f), "up": (n, d, f), "down": (n, f, d)}
  keys = iter(jax.random.split(jax.random.key(seed), len(shapes) + 2))
  normal = lambda shape: m.init_std * jax.random.normal(next(keys), shape, pdt)  # noqa: E731
  layers = {name: normal(shape) for name, shape in shapes.items()}
  layers["attn_norm"] = jnp.ones((n, d), pdt)
  layers["mlp_norm"] = jnp.ones((n, d), pdt)
  if m.qkv_bias:
    layers.update(q_bias=jnp.zeros((n, h, dh), pdt), k_bias=jnp.zeros((n, k, dh), pdt),
                  v_bias=jnp.zeros((n, k, dh), pdt))
  params = {"embed": normal((vocab_size, d)), "layers": layers, "final_norm": jnp.ones((d,), pdt)}
  if not m.tie_embeddings:
    params["lm_head"] = normal((d, vocab_size))
  return params


def from_sptlm(p: Params) -> Params:
  """sptlm's nested parameter dict in this file's layout (fresh buffers: sptlm's get donated)."""
  a, mlp = p["layers"]["attn"], p["layers"]["mlp"]
  layers = {"q": a["q"], "k": a["k"], "v": a["v"], "o": a["o"], "gate": mlp["gate"],
            "up": mlp["up"], "down": mlp["down"], "attn_norm": p["layers"]["attn_norm"]["scale"],
            "mlp_norm": p["layers"]["mlp_norm"]["scale"]}
  layers.update({f"{x}_bias": a[f"{x}_bias"] for x in "qkv" if f"{x}_bias" in a})
  out = {"embed": p["embed"], "layers": layers, "final_norm": p["final_norm"]["scale"]}
  if "lm_head" in p:
    out["lm_head"] = p["lm_head"]
  return jax.tree.map(jnp.copy, out)


def rms_norm(x_BxLxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  x = x_BxLxD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (x * scale_D.astype(jnp.float32)).astype(x_BxLxD.dtype)


def rotary(x_BxLxNxDh: jax.Array, sin_BxLx1xR2: jax.Array, cos_BxLx1xR2: jax.Array,
           style: str) -> jax.Array:
  rot = 2 * sin_BxLx1xR2.shape[-1]
  x = x_BxLxNxDh[..., :rot].astype(jnp.float32)
  if style == "rotate_half":
    x1, x2 = x[..., : rot // 2], x[..., rot // 2:]
    out = jnp.concatenate([x1 * cos_BxLx1xR2 - x2 * sin_BxLx1xR2,
                           x2 * cos_BxLx1xR2 + x1 * sin_BxLx1xR2], axis=-1)
  else:  # interleaved
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos_BxLx1xR2 - x2 * sin_BxLx1xR2,
                     x2 * cos_BxLx1xR2 + x1 * sin_BxLx1xR2], axis=-1).reshape(x.shape)
  out = out.astype(x_BxLxNxDh.dtype)
  return out if rot == x_BxLxNxDh.shape[-1] else jnp.concatenate(
      [out, x_BxLxNxDh[..., rot:]], axis=-1)


def forward(cfg: Config, params: Params, batch: dict[str, jax.Array]) -> jax.Array:
  """Token ids -> float32 logits [B, L, V]."""
  m = cfg.model
  dt = jnp.dtype(m.dtype)
  tokens_BxL, seg_BxL = batch["inputs"], batch["segment_ids"]
  b, l = tokens_BxL.shape
  # Loop-invariant pieces, once per step: rotary angles and the causal segment mask.
  rot = int(m.head_dim * m.rope_fraction)
  inv_freq = m.rope_theta ** (-jnp.arange(0, rot, 2, dtype=jnp.float32) / rot)
  angle_BxLxR2 = batch["positions"][..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angle_BxLxR2)[:, :, None], jnp.cos(angle_BxLxR2)[:, :, None]
  idx = jnp.arange(l)
  mask_BxLxL = (seg_BxL[:, :, None] == seg_BxL[:, None, :]) & (idx[:, None] >= idx[None, :])

  def layer(x_BxLxD: jax.Array, p: Params) -> tuple[jax.Array, None]:
    h_BxLxD = rms_norm(x_BxLxD, p["attn_norm"], m.norm_eps)
    q = jnp.einsum("bld,dhk->blhk", h_BxLxD, p["q"].astype(dt))
    k = jnp.einsum("bld,dhk->blhk", h_BxLxD, p["k"].astype(dt))
    v_BxLxKxDh = jnp.einsum("bld,dhk->blhk", h_BxLxD, p["v"].astype(dt))
    if m.qkv_bias:
      q, k, v_BxLxKxDh = (q + p["q_bias"].astype(dt), k + p["k_bias"].astype(dt),
                          v_BxLxKxDh + p["v_bias"].astype(dt))
    q_BxLxHxDh = rotary(q, sin, cos, m.rope_style)
    k_BxLxKxDh = rotary(k, sin, cos, m.rope_style)
    kh, g = m.num_kv_heads, m.num_heads // m.num_kv_heads
    q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, l, kh, g, m.head_dim)
    att_BxKxGxLxL = jnp.einsum("blkgd,bskd->bkgls", q_BxLxKxGxDh, k_BxLxKxDh,
                               preferred_element_type=jnp.float32) * m.head_dim ** -0.5
    att_BxKxGxLxL = jnp.where(mask_BxLxL[:, None, None], att_BxKxGxLxL, _NEG)
    probs = jax.nn.softmax(att_BxKxGxLxL, axis=-1).astype(dt)
    out_BxLxHxDh = jnp.einsum("bkgls,bskd->blkgd", probs, v_BxLxKxDh).reshape(
        b, l, m.num_heads, m.head_dim)
    x_BxLxD = x_BxLxD + jnp.einsum("blhk,hkd->bld", out_BxLxHxDh, p["o"].astype(dt))
    h_BxLxD = rms_norm(x_BxLxD, p["mlp_norm"], m.norm_eps)
    h_BxLxF = jax.nn.silu(h_BxLxD @ p["gate"].astype(dt)) * (h_BxLxD @ p["up"].astype(dt))
    return x_BxLxD + h_BxLxF @ p["down"].astype(dt), None

  if m.remat != "none":
    layer = jax.checkpoint(layer, policy=REMAT_POLICIES[m.remat], prevent_cse=not m.scan_layers)
  x_BxLxD = jnp.take(params["embed"], tokens_BxL, axis=0).astype(dt)
  if m.scan_layers:
    x_BxLxD, _ = jax.lax.scan(layer, x_BxLxD, params["layers"])
  else:
    for i in range(m.num_layers):
      x_BxLxD, _ = layer(x_BxLxD, jax.tree.map(lambda a, i=i: a[i], params["layers"]))
  x_BxLxD = rms_norm(x_BxLxD, params["final_norm"], m.norm_eps)
  w_DxV = params["embed"].T if m.tie_embeddings else params["lm_head"]
  return jnp.einsum("bld,dv->blv", x_BxLxD, w_DxV.astype(dt), preferred_element_type=jnp.float32)


def loss_fn(cfg: Config, params: Params, batch: dict[str, jax.Array]) -> jax.Array:
  """Weighted mean cross-entropy."""
  logits_BxLxV = forward(cfg, params, batch)
  label_BxL = jnp.take_along_axis(logits_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
  xent_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1) - label_BxL
  w_BxL = batch["weights"]
  return jnp.sum(xent_BxL * w_BxL) / jnp.maximum(jnp.sum(w_BxL), 1.0)


def learning_rate(cfg: Config, step: jax.Array) -> jax.Array:
  """Linear warmup from 0 (at most steps - 1 long), then linear or cosine decay to the floor."""
  t = cfg.train
  warmup = min(t.warmup_steps, t.steps - 1)
  warm = t.learning_rate * step / max(warmup, 1)
  frac = jnp.clip((step - warmup) / (t.steps - warmup), 0.0, 1.0)
  if t.schedule == "cosine":
    alpha = t.min_learning_rate / t.learning_rate
    decay = t.learning_rate * ((1 - alpha) * 0.5 * (1 + jnp.cos(jnp.pi * frac)) + alpha)
  else:
    decay = t.learning_rate + (t.min_learning_rate - t.learning_rate) * frac
  return jnp.where(step < warmup, warm, decay)


def make_minimal_step(cfg: Config) -> Callable[[State, dict], tuple[State, dict]]:
  """Forward, backward, clipped AdamW with decoupled decay on matrices; donated state."""
  t = cfg.train
  undecayed = {"attn_norm", "mlp_norm", "final_norm", "q_bias", "k_bias", "v_bias"}

  def step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict]:
    params, mu, nu = state["params"], state["mu"], state["nu"]
    loss, grads = jax.value_and_grad(lambda p: loss_fn(cfg, p, batch))(params)
    grad_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    clip = jnp.where(grad_norm < t.clip_norm, 1.0, t.clip_norm / grad_norm)
    count = state["step"] + 1
    lr = learning_rate(cfg, state["step"])
    bias1, bias2 = 1 - t.b1 ** count, 1 - t.b2 ** count

    def update(path, p, g, m, v):
      g = g * clip
      m = t.b1 * m + (1 - t.b1) * g
      v = t.b2 * v + (1 - t.b2) * g * g
      u = (m / bias1) / (jnp.sqrt(v / bias2) + t.eps)
      if str(path[-1].key) not in undecayed:
        u = u + t.weight_decay * p
      return p - lr * u, m, v

    new = jax.tree_util.tree_map_with_path(update, params, grads, mu, nu)
    pick = lambda i: jax.tree.map(lambda _, x: x[i], params, new)  # noqa: E731
    state = {"step": count, "params": pick(0), "mu": pick(1), "nu": pick(2)}
    return state, {"loss": loss, "grad_norm": grad_norm, "lr": lr}

  return jax.jit(step, donate_argnums=0)


def minimal_state(params: Params) -> State:
  """Step counter, parameters and AdamW's two moments."""
  zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
  return {"step": jnp.zeros((), jnp.int32), "params": params, "mu": zeros(), "nu": zeros()}


# ---- Benchmark -------------------------------------------------------------------------------

def synthetic_batch(cfg: Config, vocab_special_start: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Packed rows: two documents of random text and speech ids, then a little padding."""
  b, l = cfg.data.global_batch_size, cfg.data.seq_len
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_special_start, (b, l + 1), dtype=np.int32)
  first, used = int(0.6 * l), int(0.95 * l)
  seg = np.zeros((b, l), np.int32)
  seg[:, :first], seg[:, first:used] = 1, 2
  idx = np.arange(l)
  pos = np.where(seg == 1, idx, np.where(seg == 2, idx - first, 0)).astype(np.int32)
  pos = np.broadcast_to(pos, (b, l)).copy()
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
          "positions": pos, "weights": (seg > 0).astype(np.float32),
          "tasks": (seg > 0).astype(np.int32)}


def rel_diff(a: jax.Array, b: jax.Array) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def timed(step: Callable, state: Any, batch: dict, n: int) -> tuple[Any, float, float]:
  """Wall and process-CPU seconds per step over n back-to-back steps (one block at the end).

  CPU time counts this process's threads only, so it moves less than wall time when other
  jobs share the machine.
  """
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(n):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  return state, (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def xla_cost(jitted: Any, *args: Any) -> dict[str, float]:
  """XLA's static cost estimate of the compiled step (cached: no second compile)."""
  cost = jitted.lower(*args).compile().cost_analysis()
  return cost[0] if isinstance(cost, list) else cost


def bench(name: str, steps: int | None, repeats: int | None,
          peak: list[float]) -> dict[str, Any]:
  path, overrides, default_steps, default_repeats = SHAPES[name]
  steps, repeats = steps or default_steps, repeats or default_repeats
  cfg = config_lib.load(ROOT / path, overrides)
  m, d = cfg.model, cfg.data
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  program = program_lib.build(cfg, mesh)
  vocab = program.vocab
  print(f"\n== {name}: N={m.num_layers} D={m.d_model} H={m.num_heads} K={m.num_kv_heads} "
        f"Dh={m.head_dim} F={m.d_ff} V={vocab.size} tied={m.tie_embeddings} | batch "
        f"{d.global_batch_size} x seq {d.seq_len} | dtype={m.dtype} params={m.param_dtype} "
        f"remat={m.remat} scan={m.scan_layers} attention={m.attention} | "
        f"{program.num_params / 1e6:.2f}M params", flush=True)
  local = synthetic_batch(cfg, vocab.special_start)
  s_batch = program.global_batch(local)
  m_batch = jax.tree.map(jnp.asarray, local)
  minimal = make_minimal_step(cfg)

  # Same math: the minimal step from sptlm's own initial parameters, two steps each (the
  # first, with the warmup's zero learning rate, moves only the Adam moments).
  s_state = program.init()
  exact = minimal_state(from_sptlm(s_state["params"]))
  p0 = jax.tree.map(jnp.copy, exact["params"])
  t0 = time.perf_counter()
  s_state, s0 = program.step(s_state, s_batch)
  jax.block_until_ready(s0)
  s_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  exact, e0 = minimal(exact, m_batch)
  jax.block_until_ready(e0)
  m_compile = time.perf_counter() - t0
  s_state, s1 = program.step(s_state, s_batch)
  exact, e1 = minimal(exact, m_batch)
  pairs = ((e0, s0), (e1, s1))
  diffs = {"loss": max(rel_diff(e["loss"], s["loss"]) for e, s in pairs),
           "grad_norm": max(rel_diff(e["grad_norm"], s["grad_norm"]) for e, s in pairs),
           "update": max(jax.tree.leaves(jax.tree.map(  # parameter change after step 1
               lambda e, s, p: rel_diff(e - p, s - p), exact["params"],
               from_sptlm(s_state["params"]), p0)))}
  costs = {"sptlm": xla_cost(program.step, s_state, s_batch),
           "minimal": xla_cost(minimal, exact, m_batch)}
  del exact, p0
  # The minimal step's own initialisation (same distribution, different draws) is what's timed.
  m_state = minimal_state(jax.jit(init_params, static_argnums=(0, 1, 2))(
      cfg, vocab.size, cfg.train.seed))
  m_state, m0 = minimal(m_state, m_batch)
  print(f"compile+first step: sptlm {s_compile:.1f}s, minimal {m_compile:.1f}s")
  print(f"step-0 loss: sptlm {float(s0['loss']):.5f}, minimal (own init) "
        f"{float(m0['loss']):.5f}, ln V = {math.log(vocab.size):.5f}")
  print("minimal from sptlm's params, 2 steps, max relative difference: "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
  for who, c in costs.items():  # a while loop's body counts once: compare, don't sum
    print(f"XLA cost analysis, {who}: {c['flops'] / 1e9:.2f} GFLOP, "
          f"{c['bytes accessed'] / 1e9:.3f} GB accessed")

  s_times, m_times, s_cpu, m_cpu = [], [], [], []
  for r in range(repeats):  # interleaved, alternating who goes first
    order = [("s", program.step), ("m", minimal)]
    for who, fn in (order if r % 2 == 0 else order[::-1]):
      if who == "s":
        s_state, t, c = timed(fn, s_state, s_batch, steps)
        s_times.append(t)
        s_cpu.append(c)
      else:
        m_state, t, c = timed(fn, m_state, m_batch, steps)
        m_times.append(t)
        m_cpu.append(c)
  peak.append(flops_lib.measure_matmul_flops(jax.devices()[0]))
  tokens = d.global_batch_size * d.seq_len
  step_flops = flops_lib.train_flops_per_step(m, vocab.size, d.seq_len, d.global_batch_size)
  s_ms, m_ms = statistics.median(s_times) * 1e3, statistics.median(m_times) * 1e3
  print(f"sptlm ms/step:   {' '.join(f'{t * 1e3:.1f}' for t in s_times)}")
  print(f"minimal ms/step: {' '.join(f'{t * 1e3:.1f}' for t in m_times)}")
  s_c, m_c = statistics.median(s_cpu), statistics.median(m_cpu)
  print(f"process CPU s/step (median): sptlm {s_c:.3f}, minimal {m_c:.3f}, "
        f"sptlm/minimal throughput by CPU time {m_c / s_c:.3f}", flush=True)
  return {"config": name, "params": program.num_params, "tokens": tokens, "flops": step_flops,
          "s_ms": s_ms, "m_ms": m_ms, "cpu_ratio": m_c / s_c}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="tiny,lm_150m",
                      help=f"comma-separated, from {', '.join(SHAPES)}")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps per repeat (default: per config, tiny 4, lm_150m 1)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed repeats, the median counts (default: tiny 7, lm_150m 3)")
  args = parser.parse_args()
  names = [n for n in args.configs.split(",") if n]
  unknown = [n for n in names if n not in SHAPES]
  if unknown:
    parser.error(f"unknown config {unknown[0]!r}; known: {', '.join(SHAPES)}")

  dev = jax.devices()[0]
  peak = [flops_lib.measure_matmul_flops(dev)]
  print(f"jax {jax.__version__} on {dev.device_kind} ({platform.processor() or platform.machine()}"
        f"), 1 device; matmul peak {peak[0] / 1e9:.1f} GFLOP/s", flush=True)
  rows = [bench(n, args.steps, args.repeats, peak) for n in names]
  best = max(peak)
  print(f"\npeak matmul FLOP/s (best of {len(peak)} measurements in this process, float32 "
        f"1024^3): {best / 1e9:.1f} GFLOP/s")
  print("\n| config | params | tokens/step | sptlm ms/step | minimal ms/step | sptlm tok/s "
        "| minimal tok/s | sptlm/minimal | sptlm MFU | minimal MFU | sptlm/minimal by CPU time |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    s_tps, m_tps = r["tokens"] / r["s_ms"] * 1e3, r["tokens"] / r["m_ms"] * 1e3
    print(f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['tokens']} | {r['s_ms']:.1f} | "
          f"{r['m_ms']:.1f} | {s_tps:,.0f} | {m_tps:,.0f} | {s_tps / m_tps:.3f} | "
          f"{r['flops'] / (r['s_ms'] / 1e3) / best:.1%} | "
          f"{r['flops'] / (r['m_ms'] / 1e3) / best:.1%} | {r['cpu_ratio']:.3f} |")


if __name__ == "__main__":
  main()
