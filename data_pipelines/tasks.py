"""seqio tasks over text corpora: plain text, and interleaved speech-text.

Documents come from local or gs:// files (read through etils.epath, so gcsfs serves gs://):
`.jsonl` files hold one {"text": ...} per line, other files are plain text with documents
separated by blank lines. Unreadable lines and non-UTF-8 files are skipped and counted in
`SOURCE_COUNTS` (a long job never stops on one bad file). Each task's output feature is
"targets" in the speech-text vocabulary; the interleaved task runs the Interleaver (the
text-to-token model) on batches of documents inside the tf.data pipeline.
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
