"""`sptlm eval`: a task over a trained model, every requested modality setting, scored.

Held-out perplexity (task "perplexity", settings "T" and "S"): documents (a text or .jsonl
file) as text, or as the text-to-token model's speech tokens.

Likelihood tasks (sStoryCloze, tStoryCloze): per story, the context and the two endings are
rendered in text (the text tokenizer) or in speech (<|begin_of_audio|> codes <|end_of_audio|>,
the codes from the text-to-token model); setting "S->T" is a spoken context with text
endings, and so on. The endings' NLL given the context (mean per token by default, or the
sum) decides: 1 when the right ending is likelier, 0.5 on a tie. Accuracy comes with a 95%
Wilson interval (ties count half). Writes the results JSON (contracts.md), a per-example JSONL
beside it, and TensorBoard scalars under the run's tensorboard/eval/.
"""

import collections
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from sptlm.errors import InputError, MissingFileError
from sptlm.eval import scoring, storycloze
from sptlm.eval.lm import LanguageModel

log = logging.getLogger("sptlm.eval")
SETTINGS = ("S->S", "S->T", "T->S", "T->T")
TASKS = ("storycloze", "sstorycloze", "tstorycloze", "perplexity")
PPL_SETTINGS = ("T", "S")  # perplexity: of text, of speech tokens


def _variants(task: str, stories: list[storycloze.Story], seed: int
              ) -> list[tuple[str, list[storycloze.Story]]]:
  out = []
  if task in ("storycloze", "sstorycloze"):
    out.append(("sStoryCloze", stories))
  if task in ("storycloze", "tstorycloze"):
    out.append(("tStoryCloze", storycloze.t_variant(stories, seed)))
  return out


class Renderer:
  """Text in one modality as ids: text through the tokenizer, speech through the text-to-token
  model (synthesized once per distinct text)."""

  def __init__(self, lm: LanguageModel, t2t: Any = None):
    self.lm, self.t2t = lm, t2t
    self.boa = lm.vocab.special_id("<|begin_of_audio|>")
    self.eoa = lm.vocab.special_id("<|end_of_audio|>")
    self.codes: dict[str, np.ndarray] = {}

  def prepare_speech(self, texts: Sequence[str]) -> None:
    todo = sorted({t for t in texts if t not in self.codes})
    if todo:
      for t, c in zip(todo, self.t2t.synthesize(todo)):
        self.codes[t] = c

  def ids(self, text: str, modality: str) -> list[int] | None:
    if modality == "T":
      return self.lm.tokenizer.encode(text)
    codes = self.codes.get(text)
    if codes is None or len(codes) == 0:
      return None  # nothing speakable
    return [self.boa] + self.lm.vocab.speech_id(np.asarray(codes)).tolist() + [self.eoa]


def score_stories(lm: LanguageModel, renderer: Renderer, stories: list[storycloze.Story],
                  setting: str, reduce: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Per-story rows (NLLs, score) of one setting, and what was skipped or cut."""
  ctx_mod, cont_mod = setting.split("->")
  counts: collections.Counter = collections.Counter()
  pairs, kept = [], []
  for s in stories:
    ctx, right, wrong = (renderer.ids(s.context, ctx_mod), renderer.ids(s.right, cont_mod),
                         renderer.ids(s.wrong, cont_mod))
    if not ctx or not right or not wrong:
      counts["stories without speakable text"] += 1
      continue
    room = lm.max_length() + 1 - max(len(right), len(wrong))
    if room < 1:
      counts["endings longer than the model's length"] += 1
      continue
    if len(ctx) > room:
      counts["cut: contexts cut to the model's length (from the left)"] += 1
      ctx = ctx[-room:]
    pairs += [(ctx, right), (ctx, wrong)]
    kept.append(s)
  nlls = lm.continuation_nlls(pairs, desc=setting)
  rows = []
  for k, s in enumerate(kept):
    nr = scoring.continuation_nll(nlls[2 * k].tolist(), reduce)
    nw = scoring.continuation_nll(nlls[2 * k + 1].tolist(), reduce)
    rows.append({"id": s.id, "context": s.context, "right": s.right, "wrong": s.wrong,
                 "nll_right": nr, "nll_wrong": nw, "score": scoring.pair_score(nr, nw)})
  return rows, dict(counts)


def evaluate(workdir: str, task: str, data: str, *, settings: Sequence[str] | None = None,
             limit: int | None = None, out: str | None = None, t2t: str | None = None,
             reduce: str = "mean", seed: int = 0) -> list[dict[str, Any]]:
  """Runs `task` on the newest checkpoint of `workdir`; returns (and writes) the results."""
  if task not in TASKS:
    raise InputError(f"--task {task!r} is not one of: {', '.join(TASKS)}")
  allowed = PPL_SETTINGS if task == "perplexity" else SETTINGS
  settings = list(settings or allowed)
  bad = [s for s in settings if s not in allowed]
  if bad:
    raise InputError(f"--setting {bad[0]!r} is not one of: {', '.join(allowed)} (task {task})")
  speech = any("S" in s for s in settings)
  if speech and not t2t:
    raise InputError("settings with speech need --t2t DIR (a `sptlm t2t train` work "
                     "directory) to speak the text; or ask only for text settings")
  if task == "perplexity":
    items, read_skips = _documents(data)
  else:
    items, read_skips = storycloze.read_csv(data)
  items = items[:limit] if limit else items
  if not items:
    raise InputError(f"{data} has nothing usable for task {task}")
  lm = LanguageModel.load(workdir)
  model_t2t = None
  if speech:
    from sptlm.t2t.synthesize import T2T
    model_t2t = T2T.load(t2t)
    if model_t2t.cfg.vocab.speech_size != lm.cfg.vocab.speech_size:
      raise InputError(f"--t2t {t2t} makes {model_t2t.cfg.vocab.speech_size} speech codes but "
                       f"the model has vocab.speech_size {lm.cfg.vocab.speech_size}")
  renderer = Renderer(lm, model_t2t)
  source = f"t2t:{t2t}" if speech else None
  if task == "perplexity":
    results, examples = _perplexity(lm, renderer, items, settings, read_skips, source)
  else:
    results, examples = _likelihood(lm, renderer, task, items, settings, read_skips, reduce,
                                    seed, source)
  _write(workdir, out, results, examples, lm.step)
  return results


def _likelihood(lm: LanguageModel, renderer: Renderer, task: str,
                stories: list[storycloze.Story], settings: Sequence[str],
                read_skips: dict[str, int], reduce: str, seed: int,
                source: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  variants = _variants(task, stories, seed)
  if source:
    renderer.prepare_speech([t for _, vs in variants for s in vs
                             for t in (s.context, s.right, s.wrong)])
  results, examples = [], []
  for name, vs in variants:
    for setting in settings:
      rows, counts = score_stories(lm, renderer, vs, setting, reduce)
      n = len(rows)
      total = sum(r["score"] for r in rows)
      acc = total / n if n else float("nan")
      results.append({
          "task": name, "setting": setting, "n": n, "accuracy": acc,
          "ci95": list(scoring.wilson(total, n)), "ci_method": "wilson",
          "ties": sum(r["score"] == 0.5 for r in rows), "nll": reduce,
          "speech_source": source if "S" in setting else None,
          "checkpoint_step": lm.step,
          "skipped": {**read_skips, **{k: v for k, v in counts.items() if not k.startswith("cut")}},
          "cut": sum(v for k, v in counts.items() if k.startswith("cut"))})
      examples += [{"task": name, "setting": setting, **r} for r in rows]
      log.info("%s %s: accuracy %.3f (n=%d)", name, setting, acc, n)
  return results, examples


def _documents(path: str) -> tuple[list[str], dict[str, int]]:
  from data_pipelines import sources
  if not epath.Path(path).exists() and not path.startswith("tfds:"):
    raise MissingFileError(f"perplexity data not found: {path}")
  docs, skipped = [], collections.Counter()
  for d in sources.file_documents(path):
    if isinstance(d, sources.Skipped):
      skipped[d.reason] += 1
    else:
      docs.append(d)
  return docs, dict(skipped)


def _perplexity(lm: LanguageModel, renderer: Renderer, docs: list[str],
                settings: Sequence[str], read_skips: dict[str, int],
                source: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Held-out perplexity of each document as text (T) or as speech tokens (S): windows of
  the model's length, each predicting all but its first token; exp(total NLL / tokens)."""
  if source:
    renderer.prepare_speech(docs)
  results, examples = [], []
  window = lm.max_length() + 1
  for setting in settings:
    pairs, owner, skipped = [], [], collections.Counter()
    for k, d in enumerate(docs):
      ids = renderer.ids(d, setting)
      if not ids or len(ids) < 2:
        skipped["documents without tokens"] += 1
        continue
      for start in range(0, len(ids) - 1, window - 1):
        piece = ids[start:start + window]
        if len(piece) >= 2:
          pairs.append((piece[:1], piece[1:]))
          owner.append(k)
    nlls = lm.continuation_nlls(pairs, desc=f"perplexity {setting}")
    per_doc: dict[int, list[float]] = collections.defaultdict(list)
    for k, nll in zip(owner, nlls):
      per_doc[k] += nll.tolist()
    total = sum(sum(v) for v in per_doc.values())
    tokens = sum(len(v) for v in per_doc.values())
    results.append({"task": "perplexity", "setting": setting, "n": len(per_doc),
                    "accuracy": None, "ci95": None, "perplexity": float(np.exp(total / tokens))
                    if tokens else float("nan"), "nll_per_token": total / max(tokens, 1),
                    "tokens": tokens, "speech_source": source if setting == "S" else None,
                    "checkpoint_step": lm.step, "skipped": {**read_skips, **skipped}})
    examples += [{"task": "perplexity", "setting": setting, "document": docs[k][:200],
                  "tokens": len(v), "nll_per_token": sum(v) / len(v)}
                 for k, v in sorted(per_doc.items())]
  return results, examples


def _write(workdir: str, out: str | None, results: list[dict[str, Any]],
           examples: list[dict[str, Any]], step: int) -> None:
  path = epath.Path(out) if out else epath.Path(workdir) / "eval" / f"results_{step}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=1))
  per_example = path.with_name(path.stem + ".examples.jsonl")
  per_example.write_text("".join(json.dumps(e) + "\n" for e in examples))
  from tensorboardX import SummaryWriter
  tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard" / "eval"))
  for r in results:
    setting = r["setting"].replace("->", "_to_")  # TensorBoard tags allow no ">"
    if r["accuracy"] is not None:
      tb.add_scalar(f"eval/{r['task']}/{setting}", r["accuracy"], step)
    if "perplexity" in r:
      tb.add_scalar(f"eval/perplexity/{setting}", r["perplexity"], step)
  tb.close()
