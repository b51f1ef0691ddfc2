"""`sptlm eval`: a task over a trained model, every requested modality setting, scored.

Speech comes from real audio through the speech tokenizer when the user gives it (a
StoryCloze audio manifest, a QA TSV's Wav Filename column), else from the text-to-token model;
each result's speech_source says which.

Held-out perplexity (task "perplexity", settings "T" and "S"): documents (a text or .jsonl
file) as text, or as speech tokens.

Likelihood tasks (sStoryCloze, tStoryCloze): per story, the context and the two endings are
rendered in text (the text tokenizer) or in speech (<|begin_of_audio|> codes <|end_of_audio|>);
setting "S->T" is a spoken context with text endings, and so on. The endings' NLL given the context (mean per token by default, or the
sum) decides: 1 when the right ending is likelier, 0.5 on a tie. Accuracy comes with a 95%
Wilson interval (ties count half).

Spoken QA (sptlm.eval.qa): greedy answers to the prompted question, matched against the gold
answers after normalisation. Writes the results JSON (contracts.md), a per-example JSONL
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
from sptlm.eval import qa, scoring, spoken_qa, storycloze
from sptlm.eval.lm import LanguageModel
from sptlm.eval.speaker import Speaker

log = logging.getLogger("sptlm.eval")
SETTINGS = ("S->S", "S->T", "T->S", "T->T")
TASKS = ("storycloze", "sstorycloze", "tstorycloze", "perplexity", "spoken_qa")
QA_SETTINGS = ("S->T", "S->S", "T->T")  # spoken QA's default settings (T->S also allowed)
PPL_SETTINGS = ("T", "S")  # perplexity: of text, of speech tokens


def _variants(task: str, stories: list[storycloze.Story], seed: int
              ) -> list[tuple[str, list[storycloze.Story]]]:
  out = []
  if task in ("storycloze", "sstorycloze"):
    out.append(("sStoryCloze", stories))
  if task in ("storycloze", "tstorycloze"):
    out.append(("tStoryCloze", storycloze.t_variant(stories, seed)))
  return out


def score_stories(lm: LanguageModel, speaker: Speaker, stories: list[storycloze.Story],
                  setting: str, reduce: str, batch: int = 16) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Per-story rows (NLLs, score) of one setting, and what was skipped or cut."""
  ctx_mod, cont_mod = setting.split("->")
  counts: collections.Counter = collections.Counter()
  pairs, kept = [], []
  for s in stories:
    ctx, right, wrong = (speaker.ids(s.context, ctx_mod), speaker.ids(s.right, cont_mod),
                         speaker.ids(s.wrong, cont_mod))
    if not ctx or not right or not wrong:
      counts["stories without speech" if speaker.tokenizer else
             "stories without speakable text"] += 1
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
  nlls = lm.continuation_nlls(pairs, batch=batch, desc=setting)
  rows = []
  for k, s in enumerate(kept):
    nr = scoring.continuation_nll(nlls[2 * k].tolist(), reduce)
    nw = scoring.continuation_nll(nlls[2 * k + 1].tolist(), reduce)
    rows.append({"id": s.id, "context": s.context, "right": s.right, "wrong": s.wrong,
                 "nll_right": nr, "nll_wrong": nw, "score": scoring.pair_score(nr, nw)})
  return rows, dict(counts)


def evaluate(workdir: str, task: str, data: str, *, settings: Sequence[str] | None = None,
             limit: int | None = None, out: str | None = None, t2t: str | None = None,
             reduce: str = "mean", seed: int = 0, audio: str | None = None,
             speech_tokenizer: str | None = None, overrides: Sequence[str] = (),
             batch: int | None = None, mesh: Any = None, lm: LanguageModel | None = None,
             write: bool = True) -> list[dict[str, Any]]:
  """Runs `task` on the newest checkpoint of `workdir` (or on `lm`); returns (and writes)
  the results. `overrides` set eval.* keys of the model's config for this run."""
  if task not in TASKS:
    raise InputError(f"--task {task!r} is not one of: {', '.join(TASKS)}")
  allowed = PPL_SETTINGS if task == "perplexity" else SETTINGS
  settings = list(settings or (QA_SETTINGS if task == "spoken_qa" else allowed))
  bad = [s for s in settings if s not in allowed]
  if bad:
    raise InputError(f"--setting {bad[0]!r} is not one of: {', '.join(allowed)} (task {task})")
  items, read_skips = _read(task, data)
  items = items[:limit] if limit else items
  if not items:
    raise InputError(f"{data} has nothing usable for task {task}")
  lm = lm or LanguageModel.load(workdir, mesh)
  ecfg = _eval_config(lm.cfg, overrides, batch)
  t2t = t2t or ecfg.t2t or None
  speech_tokenizer = speech_tokenizer or ecfg.speech_tokenizer or None
  needs_speech = any(s.startswith("S") if task == "spoken_qa" else "S" in s for s in settings)
  audio_files = _audio_files(task, data, audio, items) if needs_speech else None
  speaker = _speaker(lm, needs_speech, t2t, speech_tokenizer, audio_files,
                     audio or data if audio_files else None)
  asr = None
  if task == "spoken_qa" and any(s.endswith("->S") for s in settings):
    asr = _tokenizer(speech_tokenizer, lm, "S->S answers are transcribed by")
  if task == "perplexity":
    results, examples = _perplexity(lm, speaker, items, settings, read_skips, ecfg)
  elif task == "spoken_qa":
    results, examples = _spoken_qa(lm, speaker, items, settings, read_skips, ecfg, asr, data)
  else:
    results, examples = _likelihood(lm, speaker, task, items, settings, read_skips, reduce,
                                    seed, ecfg)
  if write:
    _write(workdir, out, results, examples, lm.step)
  return results


def _eval_config(cfg: Any, overrides: Sequence[str], batch: int | None) -> Any:
  import dataclasses

  import ml_collections

  from sptlm import config as config_lib
  from sptlm import config_io
  ecfg = cfg.eval
  if overrides:
    raw = ml_collections.ConfigDict({"eval": dataclasses.asdict(ecfg)})
    for o in overrides:
      if not o.removeprefix("--").removeprefix("config.").startswith("eval."):
        raise config_lib.ConfigError(f"sptlm eval takes only --config.eval.KEY overrides, "
                                     f"not {o!r}")
    config_io.apply_overrides(raw, list(overrides))
    ecfg = config_io.convert(raw.eval.to_dict(), config_lib.EvalConfig, "eval")
    config_lib.validate_eval(ecfg)
  if batch:
    ecfg = dataclasses.replace(ecfg, batch=batch)
  return ecfg


def _read(task: str, data: str) -> tuple[list[Any], dict[str, int]]:
  if task == "perplexity":
    return _documents(data)
  if task == "spoken_qa":
    return spoken_qa.read(data)
  return storycloze.read_csv(data)


def _audio_files(task: str, data: str, audio: str | None, items: list[Any]
                 ) -> dict[str, list[str]] | None:
  """{text: WAV files} when the user gives audio (a StoryCloze manifest, or a QA TSV's Wav
  Filename column); None: speech comes from the text-to-token model."""
  if task == "spoken_qa":
    if audio:
      raise InputError("--audio is for StoryCloze; a spoken QA TSV names its audio in its "
                       "Wav Filename column")
    files = {q.text: [q.audio] for q in items if q.audio}
    return files or None
  if audio and task == "perplexity":
    raise InputError("--audio is for StoryCloze and spoken QA, not perplexity")
  if audio:
    files, skipped = storycloze.read_audio_manifest(audio, items)
    if skipped:
      log.warning("%s: %s", audio, skipped)
    return files
  return None


def _tokenizer(path: str | None, lm: LanguageModel, why: str) -> Any:
  from sptlm.speech.tokenizer import SpeechTokenizer
  if not path:
    raise InputError(f"{why} the speech tokenizer: give --speech-tokenizer DIR (a `sptlm "
                     "tokenizer train` work directory) or set eval.speech_tokenizer")
  tok = SpeechTokenizer.load(path)
  if tok.codebook_size != lm.cfg.vocab.speech_size:
    raise InputError(f"--speech-tokenizer {path} has {tok.codebook_size} codes but the model "
                     f"has vocab.speech_size {lm.cfg.vocab.speech_size}")
  return tok


def _speaker(lm: LanguageModel, needs_speech: bool, t2t: str | None,
             speech_tokenizer: str | None, audio_files: dict[str, list[str]] | None,
             audio_source: str | None) -> Speaker:
  if not needs_speech:
    return Speaker(lm)
  if audio_files is not None:
    tok = _tokenizer(speech_tokenizer, lm, "audio is tokenized by")
    speaker = Speaker(lm, tokenizer=tok, source=f"audio:{audio_source} via {speech_tokenizer}")
    speaker.load_audio(audio_files)
    return speaker
  if not t2t:
    raise InputError("settings with speech need --t2t DIR (a `sptlm t2t train` work "
                     "directory) to speak the text, or audio; or ask only for text settings")
  from sptlm.t2t.synthesize import T2T
  model_t2t = T2T.load(t2t)
  if model_t2t.cfg.vocab.speech_size != lm.cfg.vocab.speech_size:
    raise InputError(f"--t2t {t2t} makes {model_t2t.cfg.vocab.speech_size} speech codes but "
                     f"the model has vocab.speech_size {lm.cfg.vocab.speech_size}")
  return Speaker(lm, t2t=model_t2t, source=f"t2t:{t2t}")


def _likelihood(lm: LanguageModel, speaker: Speaker, task: str,
                stories: list[storycloze.Story], settings: Sequence[str],
                read_skips: dict[str, int], reduce: str, seed: int,
                ecfg: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  variants = _variants(task, stories, seed)
  speaker.prepare([t for _, vs in variants for s in vs for t in (s.context, s.right, s.wrong)])
  results, examples = [], []
  for name, vs in variants:
    for setting in settings:
      rows, counts = score_stories(lm, speaker, vs, setting, reduce, ecfg.batch)
      results.append(_accuracy(name, setting, rows, counts, read_skips, speaker, lm,
                               {"nll": reduce}))
      examples += [{"task": name, "setting": setting, **r} for r in rows]
  return results, examples


def _spoken_qa(lm: LanguageModel, speaker: Speaker, questions: list[spoken_qa.Question],
               settings: Sequence[str], read_skips: dict[str, int], ecfg: Any, asr: Any,
               data: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  name = "WebQuestions" if data.endswith(".json") else "LLaMA-Questions"
  speaker.prepare([q.text for q in questions])
  results, examples = [], []
  for setting in settings:
    rows, counts = qa.answer(lm, speaker, questions, setting, ecfg, asr)
    results.append(_accuracy(name, setting, rows, counts, read_skips, speaker, lm,
                             {"decoding": "greedy", "prompt": ecfg.qa_prompt}))
    examples += [{"task": name, "setting": setting, **r} for r in rows]
  return results, examples


def _accuracy(task: str, setting: str, rows: list[dict[str, Any]], counts: dict[str, int],
              read_skips: dict[str, int], speaker: Speaker, lm: LanguageModel,
              extra: dict[str, Any]) -> dict[str, Any]:
  """One results entry (contracts.md): accuracy, n and the 95% Wilson interval (ties half)."""
  n = len(rows)
  total = sum(r["score"] for r in rows)
  acc = total / n if n else float("nan")
  log.info("%s %s: accuracy %.3f (n=%d)", task, setting, acc, n)
  skipped = {**read_skips, **(dict(speaker.problems) if "S" in setting else {}),
             **{k: v for k, v in counts.items() if not k.startswith("cut")}}
  return {"task": task, "setting": setting, "n": n, "accuracy": acc,
          "ci95": list(scoring.wilson(total, n)), "ci_method": "wilson",
          "ties": sum(r["score"] == 0.5 for r in rows), **extra,
          "speech_source": speaker.source if "S" in setting else None,
          "checkpoint_step": lm.step, "model": lm.source, "skipped": skipped,
          "cut": sum(v for k, v in counts.items() if k.startswith("cut"))}


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


def _perplexity(lm: LanguageModel, speaker: Speaker, docs: list[str],
                settings: Sequence[str], read_skips: dict[str, int],
                ecfg: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Held-out perplexity of each document as text (T) or as speech tokens (S): windows of
  the model's length, each predicting all but its first token; exp(total NLL / tokens)."""
  speaker.prepare(docs)
  results, examples = [], []
  window = lm.max_length() + 1
  for setting in settings:
    pairs, owner, skipped = [], [], collections.Counter()
    for k, d in enumerate(docs):
      ids = speaker.ids(d, setting)
      if not ids or len(ids) < 2:
        skipped["documents without tokens"] += 1
        continue
      for start in range(0, len(ids) - 1, window - 1):
        piece = ids[start:start + window]
        if len(piece) >= 2:
          pairs.append((piece[:1], piece[1:]))
          owner.append(k)
    nlls = lm.continuation_nlls(pairs, batch=ecfg.batch, desc=f"perplexity {setting}")
    per_doc: dict[int, list[float]] = collections.defaultdict(list)
    for k, nll in zip(owner, nlls):
      per_doc[k] += nll.tolist()
    total = sum(sum(v) for v in per_doc.values())
    tokens = sum(len(v) for v in per_doc.values())
    results.append({"task": "perplexity", "setting": setting, "n": len(per_doc),
                    "accuracy": None, "ci95": None, "perplexity": float(np.exp(total / tokens))
                    if tokens else float("nan"), "nll_per_token": total / max(tokens, 1),
                    "tokens": tokens,
                    "speech_source": speaker.source if setting == "S" else None,
                    "checkpoint_step": lm.step, "skipped": {**read_skips, **skipped}})
    examples += [{"task": "perplexity", "setting": setting, "document": docs[k][:200],
                  "tokens": len(v), "nll_per_token": sum(v) / len(v)}
                 for k, v in sorted(per_doc.items())]
  return results, examples


def _write(workdir: str, out: str | None, results: list[dict[str, Any]],
           examples: list[dict[str, Any]], step: int) -> None:
  import jax
  if jax.process_index() != 0:
    return
  path = epath.Path(out) if out else epath.Path(workdir) / "eval" / f"results_{step}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=1))
  per_example = path.with_name(path.stem + ".examples.jsonl")
  per_example.write_text("".join(json.dumps(e) + "\n" for e in examples))
  from sptlm.train.metrics import summary_writer
  tb = summary_writer(str(epath.Path(workdir) / "tensorboard" / "eval"))
  for r in results:
    setting = r["setting"].replace("->", "_to_")  # TensorBoard tags allow no ">"
    if r["accuracy"] is not None:
      tb.add_scalar(f"eval/{r['task']}/{setting}", r["accuracy"], step)
    if "perplexity" in r:
      tb.add_scalar(f"eval/perplexity/{setting}", r["perplexity"], step)
  tb.close()
