"""seqio tasks: plain text, interleaved speech-text, speech-only, ASR and TTS.

Documents come from local or gs:// files (read through etils.epath, so gcsfs serves gs://):
`.jsonl` files hold one {"text": ...} per line, other files are plain text with documents
separated by blank lines. Unreadable lines and non-UTF-8 files are skipped and counted in
`SOURCE_COUNTS` (a long job never stops on one bad file). Each task's output feature is
"targets" in the speech-text vocabulary; the interleaved task runs the Interleaver (the
text-to-token model) on batches of documents inside the tf.data pipeline.

Speech-only, ASR and TTS tasks read JSON lines with raw codebook indices: {"tokens"} (what
`sptlm tokenizer encode` prints) or {"text", "tokens"} (TTS pairs, `sptlm t2t synthesize`).
Their examples carry "weights" (1 where the loss counts), laid out as sources.py says.
"""

import functools
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf

from data_pipelines.interleave import Interleaver
from data_pipelines.seqio_vocab import SpeechTextVocabulary
from data_pipelines.sources import SOURCE_COUNTS  # noqa: F401 (callers read the counts here)
from data_pipelines.sources import layout_record, read_documents, read_token_records


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
  """Maps a record to (targets, weights) with layout_record."""
  def build(text: bytes, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return layout_record(vocab.tokenizer, vocab.layout, kind, text.decode("utf-8"), codes)

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
