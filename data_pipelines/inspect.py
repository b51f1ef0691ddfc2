"""`sptlm data inspect`: a data config's tasks, shown as people read them, with statistics.

Each task's first items go through the same ExampleBuilder that `sptlm data materialize` runs
(the text tokenizer; for interleaved tasks the text-to-token model), so examples print with
speech spans as `[audio: N tokens "source text"]`. Statistics per task: examples, tokens,
speech share, loss tokens, and for interleaved tasks the spans: length mean and histogram in
LM text tokens (what lambda is about) and the spoken fraction of LM tokens (what eta is about).
Then the mixture: each task's target token share, the per-example sampling weights that give
it (from the measured tokens per example), and the token shares measured over a draw of
examples through the same grain mixture the trainer uses.
"""

import collections
from typing import Any

import grain
import numpy as np

from data_pipelines import mixture, sources
from data_pipelines.config import DataPipelineConfig, TaskSpec
from data_pipelines.examples import ExampleBuilder, task_items
from data_pipelines.seqio_vocab import SpeechTextVocabulary


def _histogram(values: list[int], edges: tuple[int, ...] = (1, 5, 9, 13, 17, 21, 31)) -> str:
  counts = np.histogram(values, bins=list(edges) + [max(max(values, default=0) + 1, 32)])[0]
  labels = [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
  return "  ".join(f"{lab}: {c}" for lab, c in zip(labels, counts))


def _items(task: TaskSpec, cfg: DataPipelineConfig, limit: int,
           skipped: collections.Counter) -> list[Any]:
  """The task's first `limit` usable items; the unusable ones before them counted."""
  out = []
  for item in task_items(task, cfg.vocab.speech_size):
    if len(out) >= limit:
      break
    if isinstance(item, sources.Skipped):
      skipped[item.reason] += 1
    else:
      out.append(item)
  return out


def measured_shares(lengths: dict[str, list[int]], weights: dict[str, float],
                    draws: int = 20_000, seed: int = 0) -> dict[str, float]:
  """Token shares of `draws` examples drawn through grain's mixture with `weights`."""
  names = list(lengths)
  parts = [grain.MapDataset.source(lengths[n]).shuffle(seed=seed).repeat(None)
           .map(lambda x, i=i: (i, x)) for i, n in enumerate(names)]
  mixed = grain.MapDataset.mix(parts, [weights[n] for n in names])
  tokens = np.zeros(len(names))
  for i in range(draws):
    task, n = mixed[i]
    tokens[task] += n
  return {n: float(t / tokens.sum()) for n, t in zip(names, tokens)}


def inspect(cfg: DataPipelineConfig, n: int = 3, docs: int = 200, t2t: Any = None) -> list[str]:
  """The report's lines: n examples and statistics over the first `docs` items per task."""
  builder = ExampleBuilder(cfg, t2t)
  vocab = SpeechTextVocabulary(builder.tokenizer, builder.layout)
  lines: list[str] = []
  lengths: dict[str, list[int]] = {}
  for task in cfg.tasks:
    skipped: collections.Counter = collections.Counter()
    items = _items(task, cfg, docs, skipped)
    stats: collections.Counter = collections.Counter()
    span_lengths: list[int] = []
    shown: list[str] = []
    lengths[task.name] = []
    for start in range(0, len(items), cfg.interleave.batch):
      batch = items[start:start + cfg.interleave.batch]
      for item, b in zip(batch, builder.build(task.kind, batch)):
        if isinstance(b, str):
          skipped[b] += 1
          continue
        stats.update(builder.stats(b))
        lengths[task.name].append(len(b.ids))
        span_lengths += list(b.span_tokens)
        if len(shown) < n:
          said = [t for _, _, t in b.spans] or ([item[0]] if task.kind == "asr" else [])
          shown.append(vocab.readable(b.ids, said))
    lines.append(f"== task {task.name} ({task.kind}, rate {task.rate:g}) ==")
    lines += [f"[{i}] {s}" for i, s in enumerate(shown)]
    tokens = max(stats["tokens"], 1)
    lines.append(f"examples: {stats['examples']:,}  tokens: {stats['tokens']:,}  "
                 f"tokens/example: {stats['tokens'] / max(stats['examples'], 1):,.1f}  "
                 f"speech share: {stats['speech tokens'] / tokens:.1%}  "
                 f"in the loss: {stats['loss tokens'] / tokens:.1%}")
    if task.kind == "interleaved":
      lines.append(f"spans: {len(span_lengths):,}  span length (LM tokens): mean "
                   f"{np.mean(span_lengths) if span_lengths else 0:.2f} (lambda "
                   f"{cfg.interleave.lam:g})  spoken: "
                   f"{stats['lm tokens spoken'] / max(stats['lm tokens'], 1):.1%} of LM tokens "
                   f"(eta {cfg.interleave.eta:g})")
      lines.append(f"span lengths: {_histogram(span_lengths)}")
    if skipped:
      lines.append("skipped: " + "  ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
  lines += _mixture_lines(cfg, lengths)
  return lines


def _mixture_lines(cfg: DataPipelineConfig, lengths: dict[str, list[int]]) -> list[str]:
  rates = {t.name: t.rate for t in cfg.tasks if lengths[t.name]}
  if not rates:
    return ["== mixture: no task gave an example =="]
  per_example = {k: float(np.mean(lengths[k])) for k in rates}
  weights = mixture.example_weights(rates, per_example)
  target = mixture.token_shares(rates)
  got = measured_shares({k: lengths[k] for k in rates}, weights)
  lines = ["== mixture (token shares: target, then measured over 20,000 drawn examples) =="]
  for k in rates:
    lines.append(f"{k:<16} target {target[k]:6.1%}  measured {got[k]:6.1%}  "
                 f"example weight {weights[k]:.3f}  ({per_example[k]:,.1f} tokens/example)")
  return lines
