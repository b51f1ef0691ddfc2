"""Text-corpus input through grain: read, tokenize, pack, batch, with checkpointable state.

This feeds `sptlm train` until the interleaved speech-text tasks land; they will produce the
same batch fields. A batch is a dict of [B, L] numpy arrays:
  inputs, targets (next tokens), segment_ids (1.. per packed document, 0 = padding),
  positions (restart at 0 in each document), weights (1.0 where the target counts).
"""

import dataclasses
import pathlib

import grain
import numpy as np
import sentencepiece as spm

FIELDS = ("inputs", "targets", "weights")


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
    raise FileNotFoundError(f"corpus not found: {path} (set data.corpus)") from None
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"corpus {path} is not UTF-8 text (byte {e.start}); convert it first") from None
  blocks = text.replace("\r\n", "\n").split("\n\n")
  docs = [b.strip() for b in blocks if b.strip()]
  return docs, len(blocks) - len(docs)


def load_tokenizer(path: pathlib.Path, text_size: int) -> spm.SentencePieceProcessor:
  if not path.is_file():
    raise FileNotFoundError(f"text tokenizer not found: {path} (set vocab.text_tokenizer)")
  sp = spm.SentencePieceProcessor(model_file=str(path))
  if sp.vocab_size() > text_size:
    raise ValueError(f"text tokenizer {path} has {sp.vocab_size()} pieces but vocab.text_size "
                     f"is {text_size}; raise vocab.text_size")
  return sp


def make_examples(docs: list[str], sp: spm.SentencePieceProcessor,
                  seq_len: int) -> list[dict[str, np.ndarray]]:
  """Each document + EOS, cut into pieces of at most seq_len + 1 tokens, shifted by one."""
  examples = []
  for ids in sp.encode(docs):
    ids = np.asarray(ids + [sp.eos_id()], np.int32)
    for start in range(0, len(ids) - 1, seq_len):
      piece = ids[start:start + seq_len + 1]
      if len(piece) < 2:
        continue
      examples.append({"inputs": piece[:-1], "targets": piece[1:],
                       "weights": np.ones(len(piece) - 1, np.float32)})
  return examples


def _to_batch_fields(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {
      "inputs": ex["inputs"],
      "targets": ex["targets"],
      "weights": ex["weights"],
      "segment_ids": ex["inputs_segment_ids"].astype(np.int32),
      "positions": ex["inputs_positions"].astype(np.int32),
  }


def make_dataset(examples: list[dict[str, np.ndarray]], *, seq_len: int, local_batch: int,
                 packing_bins: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """Shuffled (reshuffled each epoch), first-fit packed, batched; this host's share only."""
  if len(examples) < process_count:
    raise ValueError(f"{len(examples)} examples cannot feed {process_count} hosts")
  ds = grain.MapDataset.source(examples)[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat(None).to_iter_dataset()
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={k: seq_len for k in FIELDS},
      num_packing_bins=max(packing_bins, local_batch), seed=seed, shuffle_bins=True)
  return ds.map(_to_batch_fields).batch(local_batch, drop_remainder=True)


def corpus_dataset(corpus: pathlib.Path, tokenizer: pathlib.Path, *, text_size: int,
                   seq_len: int, local_batch: int, packing_bins: int, seed: int,
                   process_index: int = 0,
                   process_count: int = 1) -> tuple[grain.IterDataset, CorpusStats]:
  """The whole text input: a corpus file to an infinite iterator of packed batches."""
  docs, skipped = read_documents(corpus)
  if not docs:
    raise ValueError(f"corpus {corpus} has no non-empty documents")
  sp = load_tokenizer(tokenizer, text_size)
  examples = make_examples(docs, sp, seq_len)
  stats = CorpusStats(documents=len(docs), skipped_empty=skipped, examples=len(examples),
                      tokens=int(sum(len(e["inputs"]) for e in examples)))
  ds = make_dataset(examples, seq_len=seq_len, local_batch=local_batch,
                    packing_bins=packing_bins, seed=seed, process_index=process_index,
                    process_count=process_count)
  return ds, stats
