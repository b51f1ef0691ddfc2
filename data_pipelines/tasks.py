"""seqio tasks: plain text, interleaved speech-text, speech-only, ASR and TTS.

Documents come from local or gs:// files (read through etils.epath, so gcsfs serves gs://):
`.jsonl` files hold one {"text": ...} per line, other files are plain text with documents
separated by blank lines. Unreadable lines and non-UTF-8 files are skipped and counted in
`SOURCE_COUNTS` (a long job never stops on one bad file). Each task's output feature is
"targets" in the speech-text vocabulary; the interleaved task runs the Interleaver (the
text-to-token model) on batches of documents inside the tf.data pipeline.

Speech-only, ASR and TTS tasks read JSON lines with raw codebook indices: {"tokens"} (what
`sptlm tokenizer encode` prints) or {"text", "tokens"} (TTS pairs, `sptlm t2t synthesize`).
Their examples carry "weights" (1 where the loss counts), in this format (the paper leaves it
open; README documents it):
  speech-only  <|begin_of_audio|> codes <|end_of_audio|> EOS            all predicted
  ASR          <|begin_of_audio|> codes <|end_of_audio|> transcript EOS  loss on transcript+EOS
  TTS          text <|begin_of_audio|> codes <|end_of_audio|>           loss on codes+end
"""

import collections
import functools
import json
from collections.abc import Iterator, Sequence

import numpy as np
import seqio
import tensorflow as tf
from etils import epath

from data_pipelines.interleave import Interleaver
from data_pipelines.seqio_vocab import SpeechTextVocabulary

SOURCE_COUNTS: collections.Counter = collections.Counter()


def read_documents(files: Sequence[str]) -> Iterator[str]:
  """The documents of `files`, in order; bad lines and files are counted, not fatal."""
  for name in files:
    path = epath.Path(name)
    try:
      raw = path.read_bytes()
    except FileNotFoundError:
      SOURCE_COUNTS["missing files"] += 1
      continue
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      SOURCE_COUNTS["non-UTF-8 files"] += 1
      continue
    if path.name.endswith(".jsonl"):
      for line in text.splitlines():
        if not line.strip():
          continue
        try:
          doc = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
          SOURCE_COUNTS["unreadable lines"] += 1
          continue
        if isinstance(doc, str):
          yield doc
        else:
          SOURCE_COUNTS["unreadable lines"] += 1
    else:
      for block in text.replace("\r\n", "\n").split("\n\n"):
        if block.strip():
          yield block.strip()


def _source(files: Sequence[str]) -> seqio.FunctionDataSource:
  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del split, shuffle_files, seed  # one split; order is the files' order
    return tf.data.Dataset.from_generator(
        lambda: ({"text": d} for d in read_documents(files)),
        output_signature={"text": tf.TensorSpec([], tf.string)})
  return seqio.FunctionDataSource(dataset_fn, splits=["train"])


def _features(vocab: SpeechTextVocabulary) -> dict[str, seqio.Feature]:
  return {"targets": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32)}


def _rename(ds: tf.data.Dataset) -> tf.data.Dataset:
  return ds.map(lambda ex: {"targets": ex["text"]})


def text_task(name: str, files: Sequence[str], vocab: SpeechTextVocabulary) -> seqio.Task:
  """Documents tokenized as text, EOS appended."""
  return seqio.TaskRegistry.add(
      name, source=_source(files), output_features=_features(vocab),
      preprocessors=[_rename, seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim])


def _interleave(ds: tf.data.Dataset, interleaver: Interleaver, batch: int) -> tf.data.Dataset:
  """Documents -> interleaved ids, `batch` documents (and all their spans) per t2t call;
  unusable documents (counted by the interleaver) are dropped."""
  def run(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    examples = interleaver([t for t in texts])  # bytes: decoded (or counted) there
    rows = [e.ids for e in examples if e is not None]
    flat = np.concatenate(rows) if rows else np.zeros((0,), np.int32)
    return flat.astype(np.int32), np.array([len(r) for r in rows], np.int64)

  def batch_fn(ex: dict[str, tf.Tensor]) -> tf.data.Dataset:
    flat, lengths = tf.numpy_function(run, [ex["text"]], (tf.int32, tf.int64), stateful=False)
    flat.set_shape([None])
    lengths.set_shape([None])
    rows = tf.RaggedTensor.from_row_lengths(flat, lengths)
    return tf.data.Dataset.from_tensor_slices({"targets": rows})

  return ds.batch(batch).flat_map(batch_fn)


def interleaved_task(name: str, files: Sequence[str], vocab: SpeechTextVocabulary,
                     interleaver: Interleaver, batch: int = 32) -> seqio.Task:
  """Documents with ~eta of their tokens turned into speech spans (see interleave.py)."""
  return seqio.TaskRegistry.add(
      name, source=_source(files), output_features=_features(vocab),
      preprocessors=[functools.partial(_interleave, interleaver=interleaver, batch=batch),
                     seqio.preprocessors.append_eos_after_trim])


def read_token_records(files: Sequence[str], speech_size: int,
                       need_text: bool) -> Iterator[tuple[str, np.ndarray]]:
  """(text, raw codes) per JSON line of `files`: `sptlm tokenizer encode` output
  ({"tokens"}), `sptlm t2t synthesize` output or TTS pairs ({"text", "tokens"}). Unreadable
  lines, codes outside [0, speech_size) and (when `need_text`) empty texts are counted in
  SOURCE_COUNTS and skipped."""
  for name in files:
    path = epath.Path(name)
    try:
      lines = path.read_text().splitlines()
    except FileNotFoundError:
      SOURCE_COUNTS["missing files"] += 1
      continue
    except UnicodeDecodeError:
      SOURCE_COUNTS["non-UTF-8 files"] += 1
      continue
    for line in lines:
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        codes = np.asarray(rec["tokens"], np.int64).reshape(-1)
        text = rec.get("text", "") if need_text else ""
      except (ValueError, KeyError, TypeError, AttributeError):
        SOURCE_COUNTS["unreadable lines"] += 1
        continue
      if codes.size == 0:
        SOURCE_COUNTS["records without speech tokens"] += 1
      elif codes.min() < 0 or codes.max() >= speech_size:
        SOURCE_COUNTS["records with speech codes outside the codebook"] += 1
      elif need_text and (not isinstance(text, str) or not text.strip()):
        SOURCE_COUNTS["records with an empty text"] += 1
      else:
        yield text, codes.astype(np.int32)


def _records_source(files: Sequence[str], vocab: SpeechTextVocabulary,
                    need_text: bool) -> seqio.FunctionDataSource:
  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del split, shuffle_files, seed
    return tf.data.Dataset.from_generator(
        lambda: ({"text": t, "codes": c} for t, c in
                 read_token_records(files, vocab.layout.speech_size, need_text)),
        output_signature={"text": tf.TensorSpec([], tf.string),
                          "codes": tf.TensorSpec([None], tf.int32)})
  return seqio.FunctionDataSource(dataset_fn, splits=["train"])


def _paired_features(vocab: SpeechTextVocabulary) -> dict[str, seqio.Feature]:
  """targets, and weights (1 where the loss counts); EOS is placed by the task itself."""
  return {"targets": seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.int32),
          "weights": seqio.Feature(vocabulary=seqio.PassThroughVocabulary(2), add_eos=False,
                                   dtype=tf.int32)}


def _layout(vocab: SpeechTextVocabulary, kind: str):
  """Maps a record to (targets, weights) in the documented format of `kind`."""
  boa = vocab.layout.special_id("<|begin_of_audio|>")
  eoa = vocab.layout.special_id("<|end_of_audio|>")
  eos = [] if vocab.eos_id is None else [vocab.eos_id]
  offset = vocab.layout.speech_start

  def build(text: bytes, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    speech = [boa] + (codes + offset).tolist() + [eoa]
    words = vocab.tokenizer.encode(text.decode("utf-8")) if kind != "speech" else []
    if kind == "speech":  # everything is predicted
      ids, weights = speech + eos, [1] * (len(speech) + len(eos))
    elif kind == "asr":  # speech, then its transcript: the loss is on the text
      ids = speech + words + eos
      weights = [0] * len(speech) + [1] * (len(words) + len(eos))
    else:  # tts: text, then its speech: the loss is on the speech
      ids = words + speech
      weights = [0] * (len(words) + 1) + [1] * (len(speech) - 1)
    return np.asarray(ids, np.int32), np.asarray(weights, np.int32)

  def fn(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    ids, weights = tf.numpy_function(build, [ex["text"], ex["codes"]], (tf.int32, tf.int32),
                                     stateful=False)
    ids.set_shape([None])
    weights.set_shape([None])
    return {"targets": ids, "weights": weights}

  return lambda ds: ds.map(fn)


def speech_task(name: str, files: Sequence[str], vocab: SpeechTextVocabulary) -> seqio.Task:
  """Speech-only: <|begin_of_audio|> codes <|end_of_audio|> EOS, every token predicted."""
  return seqio.TaskRegistry.add(name, source=_records_source(files, vocab, False),
                                output_features=_paired_features(vocab),
                                preprocessors=[_layout(vocab, "speech")])


def asr_task(name: str, files: Sequence[str], vocab: SpeechTextVocabulary) -> seqio.Task:
  """ASR: <|begin_of_audio|> codes <|end_of_audio|> transcript EOS, loss on the transcript."""
  return seqio.TaskRegistry.add(name, source=_records_source(files, vocab, True),
                                output_features=_paired_features(vocab),
                                preprocessors=[_layout(vocab, "asr")])


def tts_task(name: str, files: Sequence[str], vocab: SpeechTextVocabulary) -> seqio.Task:
  """TTS: text <|begin_of_audio|> codes <|end_of_audio|>, loss on the codes and the end."""
  return seqio.TaskRegistry.add(name, source=_records_source(files, vocab, True),
                                output_features=_paired_features(vocab),
                                preprocessors=[_layout(vocab, "tts")])
