"""One training example as the bytes of one ArrayRecord record: token ids and loss weights.

  b"SPX1" | n: uint32 little-endian | ids: n x int32 LE | weights: n x uint8 (1 = in the loss)

Fixed and self-checking, so a shard is the same bytes on every machine, and a damaged record
is a clear error rather than wrong tokens.
"""

import numpy as np

from sptlm.errors import InputError

MAGIC = b"SPX1"
_HEADER = len(MAGIC) + 4


def encode(ids: np.ndarray, weights: np.ndarray) -> bytes:
  ids = np.asarray(ids, "<i4")
  weights = np.asarray(weights, np.uint8)
  if ids.ndim != 1 or ids.shape != weights.shape:
    raise ValueError(f"ids {ids.shape} and weights {weights.shape} must be equal 1-D shapes")
  return MAGIC + np.uint32(len(ids)).astype("<u4").tobytes() + ids.tobytes() + weights.tobytes()


def decode(record: bytes, where: str = "a record") -> tuple[np.ndarray, np.ndarray]:
  """(ids int32, weights uint8); InputError naming `where` when the bytes are not a record."""
  if len(record) < _HEADER or record[:len(MAGIC)] != MAGIC:
    raise InputError(f"{where} is not an sptlm example record (bad header); re-materialize it")
  n = int(np.frombuffer(record, "<u4", 1, len(MAGIC))[0])
  if len(record) != _HEADER + 5 * n:
    raise InputError(f"{where} is cut or damaged ({len(record)} bytes for {n} tokens); "
                     "re-materialize it")
  ids = np.frombuffer(record, "<i4", n, _HEADER).astype(np.int32)
  weights = np.frombuffer(record, np.uint8, n, _HEADER + 4 * n)
  return ids, weights
