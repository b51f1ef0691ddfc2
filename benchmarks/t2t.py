"""Text-to-token synthesis: speed on this machine, a 1B decode step on TPU, and round-trip quality.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/t2t.py speed [--workdir runs/t2t_tiny]
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/t2t.py tpu --topology v5p-8
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/t2t.py quality --t2t runs/t2t_tiny \
      --tokenizer runs/speech_tiny --corpus runs/speech_corpus
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/t2t.py batching --t2t runs/t2t_tiny \
      --corpus runs/speech_corpus

speed: the tiny t2t model (configs/t2t_tiny.py; trained weights from --workdir, else a random
init: the cost per token does not depend on the weights) generates 256 speech tokens after a
40-character prompt, no early stop, at batch 1, 16 and 128 with the KV cache (the spine's
`generate`, as `T2T.synthesize` runs it), and at batch 1 and 16 without it (each step reruns the
model over the whole prompt + 256 buffer, causally masked, and reads the logits at the current
position). In the same process: the memory bandwidth (a reduction over 1 GiB) and the matmul
rate, and from them the decode step's bound (bytes read per step: the parameters and the KV
cache; FLOPs: 2 x parameters per token) and the fraction of it reached.

tpu: a 1B t2t model (lm_1b's shape, vocabulary 28 characters + 16,384 codes) decode step with
its KV cache, compiled ahead of time for a TPU topology (libtpu, no TPU needed): memory per
chip, and the tokens/s per chip that the HBM bandwidth allows at that batch.

batching: the same held-out sentences synthesized (greedy) with static length-sorted batches
and with continuous batching, at each --batches size: tokens/s after a first (compiling) call,
and how many outputs are identical between the two.

quality: held-out sentences (the corpus's test split: neither model trained on them) ->
t2t tokens -> the tokenizer's transcribe -> WER and CER; the tokenizer's own WER on the real
audio's tokens of the same sentences (the floor); the ratio of synthesized to real token counts.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipelines.vocabulary import Vocabulary  # noqa: E402
from sptlm.model import decode, transformer  # noqa: E402
from sptlm.t2t import config as t2t_config  # noqa: E402

PROMPT, NEW = 41, 256  # 40 characters + <|begin_of_audio|>; speech tokens generated


def _model(workdir: str | None) -> tuple[transformer.Transformer, Vocabulary]:
  if workdir:
    from sptlm.t2t.synthesize import T2T
    t = T2T.load(workdir)
    return t.model, t.vocab
  cfg = t2t_config.load(REPO / "configs" / "t2t_tiny.py")
  vocab = Vocabulary(cfg.vocab.text_size, cfg.vocab.speech_size)
  return transformer.build(cfg.model, vocab.size, 0), vocab


def _timed(fn, repeats: int = 3) -> float:
  jax.block_until_ready(fn())  # compile
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def _recompute(model: transformer.Transformer, prompt_BxP: jax.Array, new: int) -> jax.Array:
  """Greedy decoding with no cache: each step reruns the model over the whole buffer."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, prompt_BxP):
    m = nnx.merge(graphdef, state)
    b, p = prompt_BxP.shape
    buf = jnp.zeros((b, p + new), jnp.int32).at[:, :p].set(prompt_BxP)
    positions = jnp.broadcast_to(jnp.arange(p + new), (b, p + new))
    segments = jnp.ones((b, p + new), jnp.int32)

    def step(t, buf):
      logits = m(buf, positions, segments)  # causal: later slots do not change slot t's logits
      token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, p + t - 1, 1, False), -1)
      return jax.lax.dynamic_update_index_in_dim(buf, token.astype(jnp.int32)[:, None], p + t, 1)

    return jax.lax.fori_loop(0, new, step, buf)

  return run(state, prompt_BxP)


def _machine() -> dict[str, float]:
  """Memory bandwidth (bytes/s, a reduction over 1 GiB) and matmul rate (FLOP/s)."""
  x = jnp.ones((256, 1024, 1024), jnp.float32)
  bw = x.nbytes / _timed(lambda: jnp.sum(x), 5)
  a = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  flops = 2 * 2048 ** 3 / _timed(lambda: mm(a), 5)
  return {"bandwidth": bw, "matmul": flops}


def speed(args: argparse.Namespace) -> dict:
  model, vocab = _model(args.workdir)
  params = nnx.state(model, nnx.Param)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  cfg = model.cfg
  machine = _machine()
  rng = np.random.default_rng(0)
  rows = []
  for b in args.batches:
    prompt = rng.integers(0, vocab.text_size, (b, PROMPT)).astype(np.int32)
    prompt[:, -1] = vocab.special_id("<|begin_of_audio|>")
    secs = _timed(lambda: decode.generate(model, prompt, max_new_tokens=NEW,
                                          rng=jax.random.PRNGKey(0)).tokens)
    # bytes read per decode step: all parameters, and the KV cache (average length)
    kv = 2 * cfg.num_layers * b * (PROMPT + NEW / 2) * cfg.num_kv_heads * cfg.head_dim * 4
    bound = min(machine["bandwidth"] / (param_bytes + kv) * b,
                machine["matmul"] / (2 * n_params))
    row = {"batch": b, "kv_cache_tokens_per_s": b * NEW / secs,
           "roofline_tokens_per_s": bound, "fraction_of_roofline": b * NEW / secs / bound}
    if b in args.recompute_batches:
      rsecs = _timed(lambda: _recompute(model, jnp.asarray(prompt), NEW), 1)
      row["recompute_tokens_per_s"] = b * NEW / rsecs
      row["kv_speedup"] = rsecs / secs
    rows.append(row)
    print(json.dumps(row), flush=True)
  return {"params": n_params, "param_bytes": param_bytes,
          "bandwidth_GBps": machine["bandwidth"] / 1e9,
          "matmul_GFLOPs": machine["matmul"] / 1e9, "rows": rows}


def tpu(args: argparse.Namespace) -> dict:
  from jax.sharding import NamedSharding, PartitionSpec as P
  from sptlm import aot, config
  lm = config.load(REPO / "configs" / "lm_1b.py")
  vocab = Vocabulary(28, 16_384)
  mcfg = dataclasses.replace(lm.model, dtype="bfloat16", param_dtype="bfloat16")
  topo = aot.parse_topology(args.topology)
  devices = aot.topology_devices(topo)
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(-1), ("data",))
  abstract = nnx.eval_shape(lambda: transformer.build(mcfg, vocab.size, 0))
  graphdef, state = nnx.split(abstract)
  cache = nnx.eval_shape(lambda: abstract.init_cache(args.batch, args.context, jnp.bfloat16))
  rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  def step(state, cache, tokens_Bx1, positions_Bx1):
    m = nnx.merge(graphdef, state)
    logits, cache = m.decode(tokens_Bx1, positions_Bx1, jnp.ones_like(tokens_Bx1), cache)
    return jnp.argmax(logits[:, -1], -1), cache

  def spec(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  layers = len(cache.k)  # per layer [B, K, S, Dh]: rows split
  cache_shardings = type(cache)((rows,) * layers, (rows,) * layers, rows, rep)
  tok = jax.ShapeDtypeStruct((args.batch, 1), jnp.int32, sharding=rows)
  compiled = jax.jit(step, donate_argnums=1).lower(
      jax.tree.map(lambda x: spec(x, rep), state),
      jax.tree.map(spec, cache, cache_shardings), tok, tok).compile()
  mem = compiled.memory_analysis()
  per_chip = (mem.argument_size_in_bytes + mem.output_size_in_bytes
              - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  param_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
  cache_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache))
  chips = len(devices)
  read = param_bytes + cache_bytes / chips  # each chip reads all weights and its cache rows
  generation = topo.jax_name.split(":")[0]  # datasheet HBM bandwidth per chip, bytes/s
  hbm_bw = {"v5p": 2.765e12, "v4": 1.2e12, "v5e": 0.819e12, "v6e": 1.64e12}[generation]
  out = {"topology": args.topology, "chips": chips, "batch": args.batch,
         "context": args.context, "params": sum(math.prod(x.shape)
                                                for x in jax.tree.leaves(state)),
         "memory_per_chip_GB": per_chip / 1e9, "bytes_read_per_step_per_chip_GB": read / 1e9,
         "bandwidth_bound_tokens_per_s_per_chip": hbm_bw / read * args.batch / chips}
  print(json.dumps(out), flush=True)
  return out


def quality(args: argparse.Namespace) -> dict:
  from sptlm.speech import manifest as manifest_lib
  from sptlm.speech import wer as wer_lib
  from sptlm.speech.tokenizer import SpeechTokenizer
  from sptlm.t2t.synthesize import T2T
  tok = SpeechTokenizer.load(args.tokenizer)
  t2t = T2T.load(args.t2t, tokenizer=tok)
  source = manifest_lib.open_source(args.corpus, cache_dir=pathlib.Path(args.t2t) / "cache",
                                  splits=(args.split,))
  utts = source.utterances(args.split)[: args.limit or None]
  refs = [u.text for u in utts]
  t = time.perf_counter()
  synth = t2t.synthesize(refs, seed=0)
  synth_s = time.perf_counter() - t
  real = tok.encode([source.load(u) for u in utts])
  hyp_synth = tok.decode(synth)
  hyp_real = tok.decode(real)
  out = {"split": args.split, "sentences": len(refs),
         "round_trip_wer": wer_lib.wer(refs, hyp_synth),
         "round_trip_cer": wer_lib.cer(refs, hyp_synth),
         "real_audio_wer": wer_lib.wer(refs, hyp_real),
         "real_audio_cer": wer_lib.cer(refs, hyp_real),
         "token_ratio": sum(map(len, synth)) / sum(map(len, real)),
         "synthesis_tokens_per_s": sum(map(len, synth)) / synth_s,
         "summary": t2t.summary.line()}
  print(json.dumps(out), flush=True)
  for r, h in list(zip(refs, hyp_synth))[:5]:
    print(f"  ref: {r}\n  hyp: {h}")
  return out


def batching(args: argparse.Namespace) -> list[dict]:
  """Static (length-sorted) batches vs continuous batching on the same real sentences."""
  from sptlm.speech import manifest as manifest_lib
  from sptlm.t2t.synthesize import T2T
  t2t = T2T.load(args.t2t)
  source = manifest_lib.open_source(args.corpus, cache_dir=pathlib.Path(args.t2t) / "cache",
                                  splits=(args.split,))
  texts = [u.text for u in source.utterances(args.split)][: args.limit or None]
  rows = []
  for batch in args.batches:
    outs = {}
    for mode in ("static", "continuous"):
      t = time.perf_counter()
      t2t.synthesize(texts, seed=0, batch_size=batch, batching=mode)  # compiles
      first = time.perf_counter() - t
      t = time.perf_counter()
      outs[mode] = t2t.synthesize(texts, seed=0, batch_size=batch, batching=mode)
      secs = time.perf_counter() - t
      tokens = sum(map(len, outs[mode]))
      rows.append({"batch": batch, "batching": mode, "texts": len(texts), "tokens": tokens,
                   "seconds": secs, "first_call_seconds": first, "tokens_per_s": tokens / secs})
      print(json.dumps(rows[-1]), flush=True)
    same = sum(np.array_equal(a, b) for a, b in zip(outs["static"], outs["continuous"]))
    print(json.dumps({"batch": batch, "identical_outputs": f"{same}/{len(texts)}"}), flush=True)
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="what", required=True)
  q = sub.add_parser("speed")
  q.add_argument("--workdir")
  q.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
  q.add_argument("--recompute-batches", type=int, nargs="+", default=[1, 16])
  q.set_defaults(fn=speed)
  q = sub.add_parser("tpu")
  q.add_argument("--topology", default="v5p-8")
  q.add_argument("--batch", type=int, default=256)
  q.add_argument("--context", type=int, default=512)
  q.set_defaults(fn=tpu)
  q = sub.add_parser("quality")
  q.add_argument("--t2t", required=True)
  q.add_argument("--tokenizer", required=True)
  q.add_argument("--corpus", required=True)
  q.add_argument("--split", default="test")
  q.add_argument("--limit", type=int, default=0)
  q.set_defaults(fn=quality)
  q = sub.add_parser("batching")
  q.add_argument("--t2t", required=True)
  q.add_argument("--corpus", required=True)
  q.add_argument("--split", default="test")
  q.add_argument("--limit", type=int, default=0)
  q.add_argument("--batches", type=int, nargs="+", default=[16, 64])
  q.set_defaults(fn=batching)
  args = p.parse_args()
  args.fn(args)


if __name__ == "__main__":
  main()
