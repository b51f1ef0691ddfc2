"""The data pipeline's stages on this machine, beside what the trainer consumes.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/data.py --config configs/data_tiny.py \
      --shards data_pipelines/assets/tiny_mixture --train-metrics runs/tiny/metrics.jsonl

Stages, each timed alone on the config's first --docs documents (examples/s, tokens/s):
  tokenize     text task: SentencePiece ids + EOS per document
  spans        span selection alone (Poisson lengths, placement) on the tokenized documents
  synthesis    interleaved task: tokenize + spans + the text-to-token model, speech tokens/s,
               and per core (process CPU seconds, all threads)
  pack         decoded examples -> split, first-fit packed, batched (grain, in memory)
  grain read   the trainer's whole input from the shards: ArrayRecord read + decode + mix +
               pack + batch at the trainer's batch shape (tiny: 16 x 128)
The trainer's consumption is the median tokens_per_s of a finished run's metrics.jsonl; the
goal is grain read >= 10x it.
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipelines import config as data_config  # noqa: E402
from data_pipelines import interleave, mixture_input, sources  # noqa: E402
from data_pipelines.examples import ExampleBuilder  # noqa: E402


def _clock() -> tuple[float, float]:
  return time.perf_counter(), time.process_time()


def _rate(name: str, start: tuple[float, float], examples: int, tokens: int,
          **extra) -> dict:
  wall = time.perf_counter() - start[0]
  cpu = time.process_time() - start[1]
  row = {"stage": name, "examples_per_s": examples / wall, "tokens_per_s": tokens / wall,
         "wall_s": wall, "cpu_s": cpu, **extra}
  print(json.dumps(row), flush=True)
  return row


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/data_tiny.py")
  p.add_argument("--shards", default="data_pipelines/assets/tiny_mixture")
  p.add_argument("--docs", type=int, default=512)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--num-shards", type=int, default=2)
  p.add_argument("--train-metrics", default="", help="a finished run's metrics.jsonl")
  args = p.parse_args()
  cfg = data_config.load(args.config)
  builder = ExampleBuilder(cfg)
  text_task = next(t for t in cfg.tasks if t.kind == "text")
  docs = [d for d in sources.read_documents(text_task.files)][:args.docs]
  rows = []

  t = _clock()
  built = builder.build("text", docs)
  rows.append(_rate("tokenize", t, len(built), sum(len(b.ids) for b in built)))

  ids = [builder.tokenizer.encode(d) for d in docs]
  t = _clock()
  for d, x in zip(docs, ids):
    interleave.choose_spans(len(x), interleave.document_rng(d, 0), cfg.interleave.lam,
                            cfg.interleave.eta)
  rows.append(_rate("spans", t, len(docs), sum(len(x) for x in ids)))

  builder.build("interleaved", docs[:cfg.interleave.batch])  # compile the t2t decode
  t = _clock()
  out = []
  for start in range(0, len(docs), cfg.interleave.batch):
    out += builder.build("interleaved", docs[start:start + cfg.interleave.batch])
  speech = sum(int(builder.layout.is_speech(b.ids).sum()) for b in out if not isinstance(b, str))
  row = _rate("synthesis", t, len(out), sum(len(b.ids) for b in out if not isinstance(b, str)),
              speech_tokens=speech)
  row["speech_tokens_per_s"] = speech / row["wall_s"]
  row["speech_tokens_per_cpu_s"] = speech / row["cpu_s"]
  print(json.dumps({"stage": "synthesis", "speech_tokens_per_s": row["speech_tokens_per_s"],
                    "speech_tokens_per_s_per_core": row["speech_tokens_per_cpu_s"]}), flush=True)
  rows.append(row)

  import grain
  examples = [{"ids": b.ids, "weights": b.weights, "task": np.int32(1)}
              for b in built + [b for b in out if not isinstance(b, str)]]
  ds = grain.MapDataset.source(examples).repeat(None).to_iter_dataset(mixture_input.READ)
  ds = grain.experimental.FlatMapIterDataset(ds, mixture_input._Split(args.seq_len))
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={k: args.seq_len for k in mixture_input.FIELDS},
      num_packing_bins=2 * args.batch, seed=0)
  it = iter(ds.map(mixture_input._to_batch_fields).batch(args.batch, drop_remainder=True))
  next(it)
  t = _clock()
  n, tokens = 200, 0
  for _ in range(n):
    tokens += int((next(it)["segment_ids"] > 0).sum())
  rows.append(_rate("pack", t, n * args.batch, tokens, batches=n, examples_are="packed rows"))

  it, _ = mixture_input.shard_batches(args.shards, rates=None, seq_len=args.seq_len,
                                      global_batch=args.batch, num_shards=args.num_shards,
                                      packing_bins=2 * args.batch, seed=0)
  next(it)
  t = _clock()
  tokens = 0
  for _ in range(n):
    tokens += int((next(it)["segment_ids"] > 0).sum())
  read = _rate("grain read", t, n * args.batch, tokens, batches=n, examples_are="packed rows")
  rows.append(read)

  if args.train_metrics:
    m = [json.loads(x) for x in pathlib.Path(args.train_metrics).read_text().splitlines()]
    consumed = float(np.median([r["tokens_per_s"] for r in m if "tokens_per_s" in r][1:]))
    print(json.dumps({"trainer_tokens_per_s": consumed,
                      "grain_read_over_trainer": read["tokens_per_s"] / consumed}), flush=True)


if __name__ == "__main__":
  main()
