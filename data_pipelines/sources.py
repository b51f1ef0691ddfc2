"""Reading a task's raw items: documents from text files, token records from JSON lines.

No TensorFlow here: seqio tasks (tasks.py), `sptlm data materialize` (Beam workers) and tests
share these. Every reader yields a `Skipped` (with the reason) for each unusable line or file,
so the caller counts it; a long job never stops on one bad file.

Speech-only, ASR and TTS records are laid out as (the paper leaves it open; README documents it):
  speech-only  <|begin_of_audio|> codes <|end_of_audio|> EOS            all predicted
  ASR          <|begin_of_audio|> codes <|end_of_audio|> transcript EOS  loss on transcript+EOS
  TTS          text <|begin_of_audio|> codes <|end_of_audio|>           loss on codes+end
"""

import collections
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
from etils import epath

from data_pipelines.text_tokenizer import TextTokenizer
from data_pipelines.vocabulary import Vocabulary

SOURCE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Skipped:
  """An item (or a whole file) that cannot be used, and why; counted, never fatal."""
  reason: str


def _read_text(name: str) -> str | Skipped:
  try:
    return epath.Path(name).read_bytes().decode("utf-8")
  except FileNotFoundError:
    return Skipped("missing files")
  except UnicodeDecodeError:
    return Skipped("non-UTF-8 files")


def tfds_documents(spec: str) -> Iterator[str | Skipped]:
  """`tfds:NAME[/CONFIG][:SPLIT[:FEATURE]]` (split `train`, feature `text` by default): the
  documents of a prepared TFDS dataset, under TFDS_DATA_DIR or TFDS's default directory (no
  download at run time)."""
  import tensorflow_datasets as tfds
  name, split, feature = (spec.removeprefix("tfds:").split(":") + ["train", "text"])[:3]
  try:
    ds = tfds.load(name, split=split, download=False, shuffle_files=False,
                   data_dir=os.environ.get("TFDS_DATA_DIR") or None)
  except (tfds.core.registered.DatasetNotFoundError, AssertionError, ValueError, OSError):
    yield Skipped("missing TFDS datasets (prepare them first; nothing is downloaded)")
    return
  for ex in tfds.as_numpy(ds):
    value = ex.get(feature) if isinstance(ex, dict) else None
    if not isinstance(value, bytes):
      yield Skipped(f"TFDS examples without a text feature {feature!r}")
      continue
    try:
      doc = value.decode("utf-8")
    except UnicodeDecodeError:
      yield Skipped("non-UTF-8 documents")
      continue
    yield doc if doc.strip() else Skipped("empty documents")


def file_documents(name: str) -> Iterator[str | Skipped]:
  """The documents of one file (or `tfds:` dataset), in order, with a Skipped for each
  unusable line or file."""
  if name.startswith("tfds:"):
    yield from tfds_documents(name)
    return
  text = _read_text(name)
  if isinstance(text, Skipped):
    yield text
    return
  if epath.Path(name).name.endswith(".jsonl"):
    for line in text.splitlines():
      if not line.strip():
        continue
      try:
        doc = json.loads(line)["text"]
      except (ValueError, KeyError, TypeError):
        doc = None
      yield doc if isinstance(doc, str) else Skipped("unreadable lines")
  else:
    for block in text.replace("\r\n", "\n").split("\n\n"):
      if block.strip():
        yield block.strip()


def read_documents(files: Sequence[str]) -> Iterator[str]:
  """The documents of `files`, in order; bad lines and files are counted in SOURCE_COUNTS."""
  for name in files:
    for doc in file_documents(name):
      if isinstance(doc, Skipped):
        SOURCE_COUNTS[doc.reason] += 1
      else:
        yield doc


@dataclasses.dataclass(frozen=True)
class AudioFile:
  """A record's audio, to be tokenized by the speech tokenizer (vocab.speech_tokenizer)."""
  path: str


def file_token_records(name: str, speech_size: int, need_text: bool
                       ) -> Iterator[tuple[str, np.ndarray | AudioFile] | Skipped]:
  """(text, raw codes) per JSON line of one file: `sptlm tokenizer encode` output
  ({"tokens"}), `sptlm t2t synthesize` output or TTS pairs ({"text", "tokens"}); or
  (text, AudioFile) for an audio manifest line ({"audio"[, "text"]}, the path absolute or
  relative to the manifest's folder, e.g. a `sptlm tokenizer build-corpus` manifest). A
  Skipped for each unreadable line, codes outside [0, speech_size) and (when `need_text`)
  empty texts."""
  text = _read_text(name)
  if isinstance(text, Skipped):
    yield text
    return
  folder = epath.Path(name).parent
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      if "tokens" not in rec and isinstance(rec.get("audio"), str):
        codes = AudioFile(str(folder / rec["audio"]))
      else:
        codes = np.asarray(rec["tokens"], np.int64).reshape(-1)
      words = rec.get("text", "") if need_text else ""
    except (ValueError, KeyError, TypeError, AttributeError):
      yield Skipped("unreadable lines")
      continue
    if need_text and (not isinstance(words, str) or not words.strip()):
      yield Skipped("records with an empty text")
    elif isinstance(codes, AudioFile):
      yield words, codes
    elif codes.size == 0:
      yield Skipped("records without speech tokens")
    elif codes.min() < 0 or codes.max() >= speech_size:
      yield Skipped("records with speech codes outside the codebook")
    else:
      yield words, codes.astype(np.int32)


def read_token_records(files: Sequence[str], speech_size: int,
                       need_text: bool) -> Iterator[tuple[str, np.ndarray]]:
  """file_token_records over `files`, the skipped ones counted in SOURCE_COUNTS (and audio
  records: the seqio tasks read tokens; `sptlm data materialize` tokenizes audio)."""
  for name in files:
    for rec in file_token_records(name, speech_size, need_text):
      if isinstance(rec, Skipped):
        SOURCE_COUNTS[rec.reason] += 1
      elif isinstance(rec[1], AudioFile):
        SOURCE_COUNTS["audio records (materialize them to tokenize their audio)"] += 1
      else:
        yield rec


def eos_id(tokenizer: TextTokenizer, layout: Vocabulary) -> int:
  """The end of a document: the text tokenizer's EOS, else the layout's <|end_of_text|>."""
  eos = tokenizer.eos_id()
  return eos if eos is not None else layout.special_id("<|end_of_text|>")


def layout_record(tokenizer: TextTokenizer, layout: Vocabulary, kind: str, text: str,
                  codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(ids, weights) of one speech / asr / tts record in the documented format of `kind`."""
  boa = layout.special_id("<|begin_of_audio|>")
  eoa = layout.special_id("<|end_of_audio|>")
  eos = [eos_id(tokenizer, layout)]
  speech = [boa] + (np.asarray(codes) + layout.speech_start).tolist() + [eoa]
  words = tokenizer.encode(text) if kind != "speech" else []
  if kind == "speech":  # everything is predicted
    ids, weights = speech + eos, [1] * (len(speech) + len(eos))
  elif kind == "asr":  # speech, then its transcript: the loss is on the text
    ids = speech + words + eos
    weights = [0] * len(speech) + [1] * (len(words) + len(eos))
  elif kind == "tts":  # text, then its speech: the loss is on the speech
    ids = words + speech
    weights = [0] * (len(words) + 1) + [1] * (len(speech) - 1)
  else:
    raise ValueError(f"not a speech record kind: {kind!r}")
  return np.asarray(ids, np.int32), np.asarray(weights, np.int32)
