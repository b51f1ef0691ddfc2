"""Packed training rows for the t2t model, with a checkpointable position.

One pair is the sequence [text units, <|begin_of_audio|>, speech ids, <|end_of_audio|>]; the
loss falls on the speech ids and <|end_of_audio|> (the model is never asked to predict text).
Pairs are shuffled per epoch (seeded) and packed in order into rows of data.seq_len tokens
(segment ids 1.., positions from 0 per pair, 0 = padding); data.global_batch_size rows make a
step. The state is (epoch, next pair), so a restored run sees exactly the same batches.
"""

import json
from collections.abc import Iterator, Sequence

import numpy as np

from data_pipelines.vocabulary import Vocabulary


def example(text_ids: Sequence[int], codes: np.ndarray, vocab: Vocabulary) -> np.ndarray:
  """The token sequence of one pair (vocabulary ids)."""
  return np.concatenate([np.asarray(text_ids, np.int32),
                         [vocab.special_id("<|begin_of_audio|>")],
                         vocab.speech_id(codes).astype(np.int32),
                         [vocab.special_id("<|end_of_audio|>")]]).astype(np.int32)


class PackedPairs(Iterator[dict[str, np.ndarray]]):
  """This host's rows of each global batch; get_state/set_state for grain's checkpoint."""

  def __init__(self, sequences: list[np.ndarray], text_lengths: list[int], *, seq_len: int,
               global_batch: int, seed: int, process_index: int = 0, process_count: int = 1):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} does not split over {process_count} hosts")
    self.seqs, self.text_lengths = sequences, text_lengths
    self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
    self.rows = slice(process_index * global_batch // process_count,
                      (process_index + 1) * global_batch // process_count)
    self.epoch, self.cursor = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.seqs))

  def _next_pair(self) -> int:
    if self.cursor == len(self._order):
      self.epoch, self.cursor = self.epoch + 1, 0
      self._order = self._permutation(self.epoch)
    i = int(self._order[self.cursor])
    self.cursor += 1
    return i

  def __next__(self) -> dict[str, np.ndarray]:
    b, l = self.global_batch, self.seq_len + 1  # inputs and targets: one token apart
    tokens = np.zeros((b, l), np.int32)
    segments = np.zeros((b, l), np.int32)
    positions = np.zeros((b, l), np.int32)
    weights = np.zeros((b, l), np.float32)
    for r in range(b):
      used, seg = 0, 0
      while True:
        save = (self.epoch, self.cursor, self._order)
        i = self._next_pair()
        s = self.seqs[i]
        if used + len(s) > l:
          if used == 0:
            raise ValueError(f"a pair of {len(s)} tokens does not fit data.seq_len={l - 1}")
          self.epoch, self.cursor, self._order = save  # it starts the next row
          break
        seg += 1
        tokens[r, used:used + len(s)] = s
        segments[r, used:used + len(s)] = seg
        positions[r, used:used + len(s)] = np.arange(len(s))
        # target j is token j + 1: the speech ids and <|end_of_audio|> follow the text + BOA
        t = self.text_lengths[i]
        weights[r, used + t:used + len(s) - 1] = 1.0
        used += len(s)
    same = segments[:, 1:] == segments[:, :-1]  # a target of another pair is no target
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "segment_ids": segments[:, :-1], "positions": positions[:, :-1],
             "weights": weights[:, :-1] * same,
             "tasks": (segments[:, :-1] > 0).astype(np.int32)}  # one task: the pairs
    return {k: v[self.rows] for k, v in batch.items()}

  def get_state(self) -> bytes:
    return json.dumps({"epoch": self.epoch, "cursor": self.cursor}).encode()

  def set_state(self, state: bytes) -> None:
    s = json.loads(state)
    self.epoch, self.cursor = int(s["epoch"]), int(s["cursor"])
    self._order = self._permutation(self.epoch)

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore; nothing to start here."""
