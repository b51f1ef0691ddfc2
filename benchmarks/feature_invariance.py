"""How engine-independent are the tokenizer's input features, before any training?

For N sentences that every engine of a multi-engine corpus says (its `test` and `test_engine`
splits), each pair of engines: for every sentence of engine A, the sentence of engine B at the
smallest DTW distance (cosine, length-normalized) over the features at 12.5 Hz; the share of
sentences that find themselves. Whisper's log-mel (each bin minus its clip mean, averaged to
80 ms) against model.frontend="speech_embedding"'s 96-d vectors and "moonshine_tiny"'s 288-d
encoder output (averaged to 80 ms). A feature in which the same
words said by two engines are closer than different words said by one is what a tokenizer
trained on some engines needs to hold on the others (issue 16).

  python benchmarks/feature_invariance.py --corpus runs/speech_corpus_kokoro --sentences 30
"""

import argparse
import itertools
import json
import pathlib
import time

import jax
import numpy as np

from sptlm.speech import audio, features, moonshine, speech_embedding


def mel_at_token_rate(x: np.ndarray) -> np.ndarray:
  m = features.log_mel(x, 128)
  m = m - m.mean(0)
  n = len(m) // features.FRAMES_PER_TOKEN * features.FRAMES_PER_TOKEN
  return m[:n].reshape(-1, features.FRAMES_PER_TOKEN, m.shape[1]).mean(1)


_embed = jax.jit(speech_embedding.embed)


def embedding(x: np.ndarray) -> np.ndarray:
  n = len(x) // features.SAMPLES_PER_TOKEN * features.SAMPLES_PER_TOKEN
  return np.asarray(_embed(speech_embedding.log_mel(x[:n])[None]))[0]


def moonshine_tiny(x: np.ndarray) -> np.ndarray:
  m = moonshine.features(x)
  n = len(m) // features.FRAMES_PER_TOKEN * features.FRAMES_PER_TOKEN
  return m[:n].reshape(-1, features.FRAMES_PER_TOKEN, m.shape[1]).mean(1)


def dtw(a: np.ndarray, b: np.ndarray) -> float:
  """Cosine-distance DTW, divided by the path-length bound len(a) + len(b)."""
  a = a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-9)
  b = b / (np.linalg.norm(b, axis=1, keepdims=True) + 1e-9)
  d = 1.0 - a @ b.T
  acc = np.full((len(a) + 1, len(b) + 1), np.inf)
  acc[0, 0] = 0.0
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      acc[i, j] = d[i - 1, j - 1] + min(acc[i - 1, j], acc[i, j - 1], acc[i - 1, j - 1])
  return float(acc[-1, -1] / (len(a) + len(b)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--corpus", required=True)
  p.add_argument("--sentences", type=int, default=30)
  args = p.parse_args()
  root = pathlib.Path(args.corpus)
  by_engine: dict[str, dict[str, dict]] = {}
  for line in (root / "manifest.jsonl").read_text().splitlines():
    row = json.loads(line)
    if row["split"] in ("test", "test_engine"):
      by_engine.setdefault(row["engine"], {})[row["text"]] = row
  common = sorted(set.intersection(*(set(v) for v in by_engine.values())))[:args.sentences]
  engines = sorted(by_engine)
  print(f"{len(common)} sentences said by each of {', '.join(engines)}")
  kinds = {"log-mel (clip-mean removed)": mel_at_token_rate, "speech_embedding": embedding,
           "moonshine_tiny": moonshine_tiny}
  start = time.time()
  feats = {(e, k): [f(audio.read(root / by_engine[e][t]["audio"]).samples) for t in common]
           for e in engines for k, f in kinds.items()}
  print(f"features: {time.time() - start:.1f} s")
  print("| engines | " + " | ".join(kinds) + " |")
  print("|---|" + "---|" * len(kinds))
  means = {k: [] for k in kinds}
  for a, b in itertools.combinations(engines, 2):
    cells = []
    for k in kinds:
      dist = np.array([[dtw(x, y) for y in feats[(b, k)]] for x in feats[(a, k)]])
      acc = float(np.mean(dist.argmin(1) == np.arange(len(common))))
      means[k].append(acc)
      cells.append(f"{acc:.0%}")
    print(f"| {a} -> {b} | " + " | ".join(cells) + " |", flush=True)
  print("| mean | " + " | ".join(f"{np.mean(v):.0%}" for v in means.values()) + " |")


if __name__ == "__main__":
  main()
