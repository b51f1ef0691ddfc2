"""Text-corpus input through grain: read, tokenize, pack, batch, with checkpointable state.

This feeds `sptlm train` until the interleaved speech-text tasks land; they will produce the
same batch fields. A batch is a dict of [B, L] numpy arrays:
  inputs, targets (next tokens), segment_ids (1.. per packed document, 0 = padding),
  positions (restart at 0 in each document), weights (1.0 where the target counts),
  tasks (the mixture task of each target, 1-based; here always 1, 0 on padding).
"""

import dataclasses
import json
import pathlib
from typing import Any

import grain
import numpy as np

from data_pipelines import text_tokenizer as text_tokenizer_lib
from data_pipelines.text_tokenizer import TextTokenizer
from sptlm.errors import InputError, MissingFileError

FIELDS = ("inputs", "targets", "weights", "tasks")


@dataclasses.dataclass(frozen=True)
class CorpusStats:
  documents: int
  skipped_empty: int
  examples: int
  tokens: int


def read_documents(path: pathlib.Path) -> tuple[list[str], int]:
  """Documents are blocks separated by blank lines; empty ones are skipped and counted."""
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    raise MissingFileError(f"corpus not found: {path} (set data.corpus)") from None
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InputError(f"corpus {path} is not UTF-8 text (byte {e.start}); convert it first") from None
  blocks = text.replace("\r\n", "\n").split("\n\n")
  docs = [b.strip() for b in blocks if b.strip()]
  return docs, len(blocks) - len(docs)


def load_tokenizer(path: pathlib.Path, text_size: int) -> TextTokenizer:
  """The text tokenizer, refused (one line) unless vocab.text_size is its size up to padding."""
  tok = text_tokenizer_lib.load(str(path))
  text_tokenizer_lib.check_size(tok, text_size)
  return tok


def make_examples(docs: list[str], tok: TextTokenizer,
                  seq_len: int) -> list[dict[str, np.ndarray]]:
  """Each document + EOS (when the tokenizer has one), cut into pieces of at most seq_len + 1
  tokens, shifted by one."""
  examples = []
  eos = [] if tok.eos_id() is None else [tok.eos_id()]
  for doc in docs:
    ids = np.asarray(tok.encode(doc) + eos, np.int32)
    for start in range(0, len(ids) - 1, seq_len):
      piece = ids[start:start + seq_len + 1]
      if len(piece) < 2:
        continue
      examples.append({"inputs": piece[:-1], "targets": piece[1:],
                       "weights": np.ones(len(piece) - 1, np.float32),
                       "tasks": np.ones(len(piece) - 1, np.int32)})
  return examples


def _to_batch_fields(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {
      "inputs": ex["inputs"],
      "targets": ex["targets"],
      "weights": ex["weights"],
      "tasks": ex["tasks"],
      "segment_ids": ex["inputs_segment_ids"].astype(np.int32),
      "positions": ex["inputs_positions"].astype(np.int32),
  }


def make_dataset(examples: list[dict[str, np.ndarray]], *, seq_len: int, batch: int,
                 packing_bins: int, seed: int) -> grain.IterDataset:
  """Shuffled (reshuffled each epoch), first-fit packed, batched."""
  ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(None).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))  # in memory: no read threads
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={k: seq_len for k in FIELDS},
      num_packing_bins=max(packing_bins, batch), seed=seed, shuffle_bins=True)
  return ds.map(_to_batch_fields).batch(batch, drop_remainder=True)


class ShardedBatches:
  """This host's rows of each global batch, from the data shards it owns.

  The corpus is split into `num_shards` independent packed streams; global batch rows
  [s * B/S, (s+1) * B/S) come from shard s, and host p owns a contiguous range of shards. So the
  global batch is the same for any number of hosts (that divides the shard count), each host
  reads only its shards, and the iterator state (saved per host in the checkpoint) is exact.
  """

  def __init__(self, shards: dict[int, grain.IterDataset]):
    self.shard_ids = sorted(shards)
    self.iters = [iter(shards[s]) for s in self.shard_ids]

  def __iter__(self) -> "ShardedBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self.iters]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> bytes:
    return json.dumps({str(s): it.get_state() for s, it in zip(self.shard_ids, self.iters)}
                      ).encode()

  def set_state(self, state: bytes) -> None:
    self.set_states([state])

  def set_states(self, states: list[bytes | str]) -> None:
    """Restores this host's shards from the states every process of the saving run wrote, so
    a run resumes exactly on another number of hosts (data.num_shards fixed)."""
    saved: dict[str, Any] = {}
    for state in states:
      saved.update(json.loads(state))
    missing = [s for s in self.shard_ids if str(s) not in saved]
    if missing:
      raise InputError(f"the checkpoint holds data shards {sorted(saved, key=int)} but this "
                       f"host reads {self.shard_ids}; resume with the same data.num_shards")
    for s, it in zip(self.shard_ids, self.iters):
      it.set_state(saved[str(s)])

  def close(self) -> None:
    """Stops grain worker processes (data.workers) before the interpreter exits."""
    for it in self.iters:
      if hasattr(it, "close"):
        it.close()

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore; nothing to start here."""


def corpus_batches(corpus: pathlib.Path, tokenizer: pathlib.Path, *, text_size: int,
                   seq_len: int, global_batch: int, num_shards: int, packing_bins: int,
                   seed: int, process_index: int = 0,
                   process_count: int = 1) -> tuple[ShardedBatches, CorpusStats]:
  """The whole text input: a corpus file to this host's rows of each global batch."""
  if num_shards % process_count or global_batch % num_shards:
    raise InputError(f"data.num_shards={num_shards} must be a multiple of the {process_count} "
                     f"processes and divide data.global_batch_size={global_batch}")
  tok = load_tokenizer(tokenizer, text_size)  # first: a wrong tokenizer is the bigger mistake
  docs, skipped = read_documents(corpus)
  if not docs:
    raise InputError(f"corpus {corpus} has no non-empty documents")
  examples = make_examples(docs, tok, seq_len)
  if len(examples) < num_shards:
    raise InputError(f"corpus {corpus} gives {len(examples)} examples, fewer than "
                     f"data.num_shards={num_shards}")
  stats = CorpusStats(documents=len(docs), skipped_empty=skipped, examples=len(examples),
                      tokens=int(sum(len(e["inputs"]) for e in examples)))
  per_host = num_shards // process_count
  owned = range(process_index * per_host, (process_index + 1) * per_host)
  shards = {s: make_dataset(examples[s::num_shards], seq_len=seq_len,
                            batch=global_batch // num_shards, packing_bins=packing_bins,
                            seed=seed * 1_000_003 + s)
            for s in owned}
  return ShardedBatches(shards), stats
