"""Spoken QA in one setting: prompt, greedy answer, answer in words, match.

The question goes into the prompt template (eval.qa_prompt) in the setting's first modality;
then eval.qa_text_answer or eval.qa_speech_answer opens the answer. A text answer is the
generated text ids decoded (up to the first line break); a speech answer is the generated
speech codes transcribed by the speech tokenizer's ASR path. Greedy decoding, so a run is
deterministic.
"""

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines import sources
from sptlm.config import EvalConfig
from sptlm.eval import prompts, spoken_qa
from sptlm.eval.speaker import Speaker


def answer(lm: Any, speaker: Speaker, questions: Sequence[spoken_qa.Question], setting: str,
           ecfg: EvalConfig, asr: Any = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Per-question rows (prompt, prediction, gold, score) and what was skipped or cut."""
  q_mod, a_mod = setting.split("->")
  opener = ecfg.qa_speech_answer if a_mod == "S" else ecfg.qa_text_answer
  max_new = ecfg.qa_max_new_speech_tokens if a_mod == "S" else ecfg.qa_max_new_tokens
  room = lm.max_length() - max_new
  stops = prompts.special_ids(ecfg.qa_stop, lm.vocab, "eval.qa_stop")
  stops.append(sources.eos_id(lm.tokenizer, lm.vocab))
  counts: collections.Counter = collections.Counter()
  kept, prompt_ids = [], []
  for q in questions:
    ids = speaker.ids(q.text, q_mod)
    if not ids:
      counts["questions without speech"] += 1
      continue
    full = (prompts.render(ecfg.qa_prompt, ids, lm.tokenizer, lm.vocab)
            + prompts.render(opener, [], lm.tokenizer, lm.vocab, "eval.qa_*_answer"))
    if len(full) > room:
      counts["cut: prompts cut to the model's length (from the left)"] += 1
      full = full[-room:] if room > 0 else full[-1:]
    kept.append(q)
    prompt_ids.append(full)
  outputs = lm.generate(prompt_ids, max_new, stops, batch=ecfg.batch, desc=setting) if kept else []
  if a_mod == "S":
    codes = [np.asarray([t - lm.vocab.speech_start for t in out if lm.vocab.is_speech(t)],
                        np.int32) for out in outputs]
    said = asr.decode(codes) if codes else []
    counts["speech answers without speech tokens"] += sum(len(c) == 0 for c in codes)
    texts = [s if len(c) else "" for s, c in zip(said, codes)]
  else:
    codes = [None] * len(outputs)
    texts = [_text_answer(lm, out) for out in outputs]
  rows = []
  for q, ids, out, text, c in zip(kept, prompt_ids, outputs, texts, codes):
    rows.append({"id": q.id, "question": q.text, "prompt_tokens": len(ids),
                 "generated_tokens": len(out), "prediction": text, "gold": list(q.answers),
                 "score": float(spoken_qa.is_correct(text, q.answers)),
                 **({"answer_codes": c.tolist()} if c is not None else {})})
  return rows, {k: v for k, v in counts.items() if v}


def _text_answer(lm: Any, out: Sequence[int]) -> str:
  text_ids = [t for t in out if lm.vocab.is_text(t)]
  return lm.tokenizer.decode(text_ids).split("\n")[0].strip()
