"""`sptlm data inspect`: a data config's tasks, shown as people read them, with statistics.

Each task's first documents go through the task's own processing (the text tokenizer; for
interleaved tasks the Interleaver with the text-to-token model), so the spans and their source
text are at hand: examples print with speech spans as `[audio: N tokens "source text"]`.
Statistics per task: documents, tokens, speech share, spans, span length (mean and histogram
in LM text tokens, what lambda is about), speech coverage of the LM tokens (what eta is about).
"""

import collections
import itertools
from typing import Any

import numpy as np

from data_pipelines import interleave as interleave_lib
from data_pipelines import tasks as tasks_lib
from data_pipelines import text_tokenizer as text_tokenizer_lib
from data_pipelines.config import DataPipelineConfig
from data_pipelines.seqio_vocab import SpeechTextVocabulary
from data_pipelines.vocabulary import Vocabulary
from sptlm.errors import InputError


def vocabulary(cfg: DataPipelineConfig) -> SpeechTextVocabulary:
  tok = text_tokenizer_lib.load(cfg.vocab.text_tokenizer)
  text_tokenizer_lib.check_size(tok, cfg.vocab.text_size)
  return SpeechTextVocabulary(tok, Vocabulary(cfg.vocab.text_size, cfg.vocab.speech_size))


def interleaver(cfg: DataPipelineConfig, vocab: SpeechTextVocabulary,
                t2t: Any = None) -> interleave_lib.Interleaver:
  """The config's Interleaver; `t2t` (a loaded T2T) defaults to interleave.t2t."""
  if t2t is None:
    from sptlm.t2t.synthesize import T2T
    t2t = T2T.load(cfg.interleave.t2t)
  if t2t.cfg.vocab.speech_size != cfg.vocab.speech_size:
    raise InputError(f"interleave.t2t {cfg.interleave.t2t} makes {t2t.cfg.vocab.speech_size} "
                     f"speech codes but vocab.speech_size is {cfg.vocab.speech_size}")
  i = cfg.interleave
  return interleave_lib.Interleaver(vocab.tokenizer, vocab.layout, t2t.synthesize,
                                    lam=i.lam, eta=i.eta, seed=i.seed)


def _histogram(values: list[int], edges: tuple[int, ...] = (1, 5, 9, 13, 17, 21, 31)) -> str:
  counts = np.histogram(values, bins=list(edges) + [max(max(values, default=0) + 1, 32)])[0]
  labels = [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
  return "  ".join(f"{lab}: {c}" for lab, c in zip(labels, counts))


def inspect(cfg: DataPipelineConfig, n: int = 3, docs: int = 200, t2t: Any = None) -> list[str]:
  """The report's lines: n examples and statistics over `docs` documents per task."""
  vocab = vocabulary(cfg)
  inter = interleaver(cfg, vocab, t2t) if any(t.kind == "interleaved" for t in cfg.tasks) \
      else None
  total_rate = sum(t.rate for t in cfg.tasks)
  lines: list[str] = []
  for task in cfg.tasks:
    tasks_lib.SOURCE_COUNTS.clear()
    documents = list(itertools.islice(tasks_lib.read_documents(task.files), docs))
    stats: collections.Counter = collections.Counter()
    span_lengths: list[int] = []
    shown: list[str] = []
    if task.kind == "text":
      eos = [] if vocab.eos_id is None else [vocab.eos_id]
      for d in documents:
        ids = vocab.tokenizer.encode(d) + eos
        stats["tokens"] += len(ids)
        stats["text tokens"] += len(ids)
        if len(shown) < n:
          shown.append(vocab.readable(ids))
    else:
      inter.counts.clear()
      for start in range(0, len(documents), cfg.interleave.batch):
        for ex in inter(documents[start:start + cfg.interleave.batch]):
          if ex is None:
            continue
          stats["tokens"] += len(ex.ids) + 1
          stats["speech tokens"] += int(vocab.speech_mask(ex.ids).sum())
          stats["lm tokens"] += ex.text_tokens
          stats["lm tokens spoken"] += sum(ex.span_tokens)
          span_lengths += list(ex.span_tokens)
          if len(shown) < n:
            shown.append(vocab.readable(ex.ids, [t for _, _, t in ex.spans]))
      stats.update({f"skipped: {k}": v for k, v in inter.counts.items() if k != "documents"})
    stats.update({f"skipped: {k}": v for k, v in tasks_lib.SOURCE_COUNTS.items()})
    lines.append(f"== task {task.name} ({task.kind}, rate {task.rate:g}: "
                 f"{task.rate / total_rate:.1%} of examples) ==")
    for i, s in enumerate(shown):
      lines.append(f"[{i}] {s}")
    lines.append(f"documents: {len(documents):,}  tokens: {stats['tokens']:,}  "
                 f"tokens/example: {stats['tokens'] / max(len(documents), 1):,.1f}")
    if task.kind == "interleaved":
      lines.append(f"speech share: {stats['speech tokens'] / max(stats['tokens'], 1):.1%} of "
                   f"tokens  spans: {len(span_lengths):,}  span length (LM tokens): mean "
                   f"{np.mean(span_lengths) if span_lengths else 0:.2f} (lambda "
                   f"{cfg.interleave.lam:g})  spoken: "
                   f"{stats['lm tokens spoken'] / max(stats['lm tokens'], 1):.1%} of LM tokens "
                   f"(eta {cfg.interleave.eta:g})")
      lines.append(f"span lengths: {_histogram(span_lengths)}")
    skipped = {k: v for k, v in stats.items() if k.startswith("skipped")}
    if skipped:
      lines.append("  ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
  return lines
