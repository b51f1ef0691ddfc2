"""The eval tasks as seqio tasks with metric functions, so a seqio.Evaluator drives them too.

    names = seqio_tasks.register(lm, "tstorycloze", "cloze_val.csv")  # or a Speaker: speech
    evaluator = seqio.Evaluator(names[0], seqio_tasks.feature_converter(), "validation")
    metrics, _ = evaluator.evaluate(compute_metrics=True, score_fn=seqio_tasks.score_fn(lm),
                                    predict_fn=seqio_tasks.predict_fn(lm))
    metrics.result()[names[0]]["accuracy"]  # what `sptlm eval --task tstorycloze` reports

Design:
- Pre-tokenized features. At registration the Speaker renders every text in the setting's
  modality (text ids, or <|begin_of_audio|> codes <|end_of_audio|>), contexts and prompts are
  cut to the model's length as `sptlm eval` cuts them, and the examples hold token ids: speech
  settings work exactly like text ones, and nothing is tokenized inside tf.data.
- Ids are sptlm's joint ids plus one. seqio pads with 0 and reads 0 as padding, while id 0 is a
  real token of some text tokenizers (a Hugging Face tokenizer's first piece); the shift keeps
  0 free. The features' vocabulary (`vocabulary`) removes the shift and decodes through
  data_pipelines' SpeechTextVocabulary (text as text, speech as <|audio_N|> markers).
- Likelihood (sptlm_eval_sstorycloze_<setting>, sptlm_eval_tstorycloze_<setting>): one
  example per (story, ending), the right ending first, `idx` = [story, ending]. `score_fn`
  gives each the ending's log-likelihood given the context (minus its mean per-token NLL by
  default, or the sum); `rank_accuracy` credits a story 1 when its right ending scores
  highest, 1/k when it ties with k-1 others: with two endings, scoring.pair_score's rule.
- Spoken QA (sptlm_eval_spoken_qa_<setting>, text answers: S->T, T->T): inputs are the prompt
  (eval.qa_prompt, then eval.qa_text_answer), targets the first gold answer, `answers` all of
  them. `predict_fn` answers greedily and returns each answer's text tokens (speech and special
  tokens dropped, as `sptlm eval` reads a text answer); the postprocessor keeps the first
  line; `qa_accuracy` is spoken_qa.is_correct over each question's gold answers.
- The adapters read seqio.PrefixLMFeatureConverter(pack=False)'s features
  (`feature_converter()`): the context is where decoder_causal_attention is 1 but the last
  position, the continuation the rest of the non-padding tokens.
Setting "S->T" is "s_t" in task names (seqio allows only word characters, '.', ':' and '#').
seqio and TensorFlow are imported when registering; the metrics are plain Python.
"""

import collections
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from data_pipelines import sources
from sptlm.config import EvalConfig
from sptlm.errors import InputError
from sptlm.eval import prompts, scoring, spoken_qa, storycloze
from sptlm.eval.speaker import Speaker

log = logging.getLogger("sptlm.eval")
STORY_SETTINGS = ("S->S", "S->T", "T->S", "T->T")
QA_SETTINGS = ("S->T", "T->T")  # S->S and T->S need the speech tokenizer's ASR: `sptlm eval`
TASKS = ("storycloze", "sstorycloze", "tstorycloze", "spoken_qa")


def task_name(task: str, setting: str, prefix: str = "sptlm_eval") -> str:
  """"tstorycloze", "S->T" -> "sptlm_eval_tstorycloze_s_t"."""
  return f"{prefix}_{task}_{setting.lower().replace('->', '_')}"


def register(speaker: Speaker | Any, task: str, data: str, *,
             settings: Sequence[str] | None = None, seed: int = 0,
             ecfg: EvalConfig | None = None, split: str = "validation",
             prefix: str = "sptlm_eval") -> list[str]:
  """Registers (or re-registers) `task` on the file `data` in each setting; returns the names.

  `speaker` is a Speaker, or a LanguageModel (text settings only). Default settings: T->T, or
  every setting when the Speaker has speech (a text-to-token model or audio). `seed` draws
  tStoryCloze's wrong endings; `ecfg` (default: the model's eval config) builds QA prompts
  (give predict_fn the same one). Names come in order: variant (s, t), then setting.
  """
  speaker = speaker if isinstance(speaker, Speaker) else Speaker(speaker)
  lm = speaker.lm
  ecfg = ecfg or lm.cfg.eval
  if task not in TASKS:
    raise InputError(f"task {task!r} is not one of: {', '.join(TASKS)}")
  allowed = QA_SETTINGS if task == "spoken_qa" else STORY_SETTINGS
  has_speech = speaker.t2t is not None or speaker.tokenizer is not None
  settings = list(settings or (allowed if has_speech else ("T->T",)))
  needs_speech = any("S" in s for s in settings)
  bad = [s for s in settings if s not in allowed]
  if bad:
    raise InputError(f"setting {bad[0]!r} is not one of: {', '.join(allowed)} (task {task}; "
                     "spoken QA with speech answers runs in `sptlm eval`)")
  if needs_speech and not has_speech:
    raise InputError(f"settings {', '.join(settings)} need speech: pass a Speaker with a "
                     "text-to-token model or audio, or ask only for T->T")
  if task == "spoken_qa":
    questions, skipped = spoken_qa.read(data)
    if not questions:
      raise InputError(f"{data} has no usable questions (skipped: {skipped})")
    speaker.prepare([q.text for q in questions] if needs_speech else [])
    made = {task_name(task, s, prefix): _qa_examples(speaker, questions, s, ecfg)
            for s in settings}
  else:
    stories, skipped = storycloze.read_csv(data)
    if not stories:
      raise InputError(f"{data} has no usable stories (skipped: {skipped})")
    variants = [(v, stories if v == "sstorycloze" else storycloze.t_variant(stories, seed))
                for v in ("sstorycloze", "tstorycloze") if task in ("storycloze", v)]
    speaker.prepare([t for _, vs in variants for s in vs for t in (s.context, s.right, s.wrong)]
                    if needs_speech else [])
    made = {task_name(v, s, prefix): _story_examples(speaker, vs, s)
            for v, vs in variants for s in settings}
  if skipped:
    log.warning("%s: skipped %s", data, skipped)
  vocab = vocabulary(lm)
  for name, (examples, dropped) in made.items():
    if dropped:
      log.warning("%s: skipped %s", name, dropped)
    if task == "spoken_qa":
      _add(name, examples, vocab, split, postprocess_answer, qa_accuracy,
           {"answers": ([None], "string")})
    else:
      _add(name, examples, vocab, split, postprocess_choice, rank_accuracy,
           {"idx": ([2], "int32"), "is_correct": ([], "bool")})
  return list(made)


def _shift(ids: Iterable[int]) -> list[int]:
  return [int(i) + 1 for i in ids]


def _story_examples(speaker: Speaker, stories: list[storycloze.Story], setting: str
                    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """One example per (story, ending), the right ending first; the context cut from the left
  so that context and ending fit the model's length."""
  ctx_mod, end_mod = setting.split("->")
  examples, dropped = [], collections.Counter()
  for k, s in enumerate(stories):
    ctx = speaker.ids(s.context, ctx_mod)
    endings = [(text, speaker.ids(text, end_mod)) for text in (s.right, s.wrong)]
    if not ctx or not all(ids for _, ids in endings):
      dropped["stories without speech"] += 1
      continue
    room = speaker.lm.max_length() + 1 - max(len(ids) for _, ids in endings)
    if room < 1:
      dropped["endings longer than the model's length"] += 1
      continue
    for j, (text, ids) in enumerate(endings):
      examples.append({"idx": [k, j], "is_correct": j == 0, "inputs": _shift(ctx[-room:]),
                       "targets": _shift(ids), "targets_pretokenized": text})
  return examples, dict(dropped)


def _qa_examples(speaker: Speaker, questions: list[spoken_qa.Question], setting: str,
                 ecfg: EvalConfig) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """The prompt with the question in the setting's modality (cut from the left to leave room
  for the answer), the first gold answer as targets, and every gold answer."""
  lm, q_mod = speaker.lm, setting.split("->")[0]
  opener = prompts.render(ecfg.qa_text_answer, [], lm.tokenizer, lm.vocab, "eval.qa_*_answer")
  room = lm.max_length() - ecfg.qa_max_new_tokens
  examples, dropped = [], collections.Counter()
  for q in questions:
    ids = speaker.ids(q.text, q_mod)
    if not ids:
      dropped["questions without speech"] += 1
      continue
    prompt = prompts.render(ecfg.qa_prompt, ids, lm.tokenizer, lm.vocab) + opener
    prompt = prompt[-room:] if room > 0 else prompt[-1:]
    answer = lm.tokenizer.encode(q.answers[0])
    examples.append({"inputs": _shift(prompt), "targets": _shift(answer),
                     "targets_pretokenized": q.answers[0], "answers": list(q.answers)})
  return examples, dict(dropped)


def _add(name: str, examples: list[dict[str, Any]], vocab: Any, split: str,
         postprocess: Callable[..., Any], metric: Callable[..., dict[str, float]],
         extra: dict[str, tuple[list[int | None], str]]) -> None:
  """Registers the examples as a seqio task (replacing one of the same name); `extra` gives
  the shape and dtype of the fields beyond inputs and targets that the metric reads."""
  import seqio
  import tensorflow as tf

  signature = {"inputs": tf.TensorSpec([None], tf.int32),
               "targets": tf.TensorSpec([None], tf.int32),
               "targets_pretokenized": tf.TensorSpec([], tf.string)}
  signature.update({k: tf.TensorSpec(shape, dtype) for k, (shape, dtype) in extra.items()})

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del split, shuffle_files, seed  # one split, in file order
    return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)

  feature = seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.int32)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn, splits=[split]),
                         output_features={"inputs": feature, "targets": feature},
                         postprocess_fn=postprocess, metric_fns=[metric])


# --- metrics and postprocessors (plain Python: seqio's legacy metric_fns) ---

def postprocess_choice(output: Any, example: dict[str, Any] | None = None,
                       is_target: bool = False) -> Any:
  """A target becomes (story, is the right ending); scores pass through."""
  if is_target:
    return int(example["idx"][0]), bool(example["is_correct"])
  return output


def postprocess_answer(output: Any, example: dict[str, Any] | None = None,
                       is_target: bool = False) -> Any:
  """A target becomes the question's gold answers; an answer, its first line."""
  if is_target:
    return tuple(a.decode("utf-8") if isinstance(a, bytes) else str(a)
                 for a in example["answers"])
  return output.split("\n")[0].strip()


def rank_accuracy(targets: Sequence[tuple[int, bool]], scores: Sequence[float]
                  ) -> dict[str, float]:
  """Rank classification over each story's endings: 1 when the right ending scores highest,
  1/k when it ties with k-1 others for the highest (two endings: scoring.pair_score)."""
  groups: dict[int, list[tuple[float, bool]]] = collections.defaultdict(list)
  for (story, right), score in zip(targets, scores):
    groups[story].append((float(score), right))
  credits = []
  for endings in groups.values():
    best = max(score for score, _ in endings)
    top = [right for score, right in endings if score == best]
    credits.append(sum(top) / len(top))
  n = len(credits)
  return {"accuracy": sum(credits) / n if n else float("nan"), "n": n,
          "ties": sum(0 < c < 1 for c in credits)}


def qa_accuracy(targets: Sequence[Sequence[str]], predictions: Sequence[str]
                ) -> dict[str, float]:
  """The share of answers containing a gold answer, both normalised (spoken_qa.is_correct)."""
  hits = [spoken_qa.is_correct(p, tuple(gold)) for gold, p in zip(targets, predictions)]
  n = len(hits)
  return {"accuracy": sum(hits) / n if n else float("nan"), "n": n}


# --- the model side: seqio's score_fn / predict_fn over a LanguageModel ---

def feature_converter() -> Any:
  """The converter the adapters read: inputs then targets, one row each, no packing."""
  import seqio
  return seqio.PrefixLMFeatureConverter(pack=False)


def _context_and_continuation(ex: dict[str, np.ndarray]) -> tuple[list[int], list[int]]:
  """sptlm ids of a PrefixLM row's inputs and targets (seqio's 0 is padding: ids are + 1)."""
  if "decoder_causal_attention" not in ex:
    raise InputError("sptlm's seqio eval tasks need seqio_tasks.feature_converter() "
                     "(seqio.PrefixLMFeatureConverter(pack=False)) in the Evaluator")
  tokens = ex["decoder_target_tokens"]
  n_ctx = int(ex["decoder_causal_attention"].sum()) - 1
  n = int(np.count_nonzero(tokens))
  return (tokens[:n_ctx] - 1).tolist(), (tokens[n_ctx:n] - 1).tolist()


def _rows(dataset: Any) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
  indices, rows = [], []
  for index, ex in dataset.as_numpy_iterator():
    indices.append(int(index))
    rows.append(_context_and_continuation(ex))
  return indices, rows


def score_fn(lm: Any, reduce: str = "mean", batch: int | None = None) -> Callable[..., Any]:
  """seqio score_fn: each example's continuation log-likelihood given its context, minus the
  mean (default) or summed per-token NLL, from lm.continuation_nlls as `sptlm eval` scores."""
  def fn(dataset: Any, model_feature_shapes: Any = None) -> list[tuple[int, float]]:
    del model_feature_shapes
    indices, pairs = _rows(dataset)
    nlls = lm.continuation_nlls(pairs, batch=batch or lm.cfg.eval.batch, desc="seqio scores")
    return [(i, -scoring.continuation_nll(nll.tolist(), reduce)) for i, nll in zip(indices, nlls)]
  return fn


def predict_fn(lm: Any, ecfg: EvalConfig | None = None) -> Callable[..., Any]:
  """seqio predict_fn: greedy answers to the examples' inputs (eval.qa_max_new_tokens, stopping
  at eval.qa_stop or EOS), each as its text tokens + 1, padded with seqio's 0."""
  ecfg = ecfg or lm.cfg.eval
  stops = prompts.special_ids(ecfg.qa_stop, lm.vocab, "eval.qa_stop")
  stops.append(sources.eos_id(lm.tokenizer, lm.vocab))

  def fn(dataset: Any, model_feature_shapes: Any = None) -> list[tuple[int, list[int]]]:
    del model_feature_shapes
    indices, rows = _rows(dataset)
    outputs = lm.generate([ctx for ctx, _ in rows], ecfg.qa_max_new_tokens, stops,
                          batch=ecfg.batch, desc="seqio answers") if rows else []
    texts = [_shift(t for t in out if lm.vocab.is_text(t)) for out in outputs]
    width = max([1] + [len(t) for t in texts])
    return [(i, t + [0] * (width - len(t))) for i, t in zip(indices, texts)]
  return fn


# --- the vocabulary of the features ---

def vocabulary(lm: Any) -> Any:
  """The features' seqio vocabulary: sptlm's joint ids + 1, decoded as SpeechTextVocabulary."""
  from data_pipelines.seqio_vocab import SpeechTextVocabulary
  return _shifted_vocabulary_type()(SpeechTextVocabulary(lm.tokenizer, lm.vocab))


@functools.cache
def _shifted_vocabulary_type() -> type:
  """The class, made on first use so that importing this module imports no TensorFlow."""
  import seqio
  import tensorflow as tf

  class ShiftedVocabulary(seqio.Vocabulary):
    """seqio id i + 1 is `inner`'s id i, so seqio's padding id 0 is never a real token."""

    def __init__(self, inner: Any):
      self.inner = inner
      super().__init__(extra_ids=0)

    @property
    def eos_id(self) -> int | None:
      return None if self.inner.eos_id is None else self.inner.eos_id + 1

    @property
    def unk_id(self) -> int | None:
      return None

    @property
    def _base_vocab_size(self) -> int:
      return self.inner.vocab_size + 1

    def _encode(self, s: str) -> list[int]:
      return _shift(self.inner.encode(s))

    def _decode(self, ids: Sequence[int]) -> str:
      return self.inner.decode([int(i) - 1 for i in ids if int(i) > 0])

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
      return self.inner.encode_tf(s) + 1

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
      """[..., L] ids -> [...] strings, padding dropped."""
      def each_row(x: np.ndarray) -> np.ndarray:
        texts = [self._decode(row).encode("utf-8") for row in x.reshape(-1, x.shape[-1])]
        return np.asarray(texts, dtype=object).reshape(x.shape[:-1])
      strings = tf.numpy_function(each_row, [ids], tf.string, stateful=False)
      strings.set_shape(ids.shape[:-1])
      return strings

    def __eq__(self, other: object) -> bool:
      return isinstance(other, ShiftedVocabulary) and other.inner == self.inner

    def __hash__(self) -> int:
      return hash(("shifted", self.inner))

  return ShiftedVocabulary
