"""The Hugging Face side: safetensors read and written a tensor at a time (never pickle).

Reading maps a file for one tensor at a time and copies it out. Writing buffers tensors
until a shard reaches its size limit, then writes it; the shards are named
model-0000i-of-0000n.safetensors with model.safetensors.index.json (or one model.safetensors).
"""

import json
import pathlib

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from sptlm.convert import ConversionError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors dtype codes whose values widen to float32 exactly; integer (quantized) and
# float8 weights would need their scales and are refused.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class Reader:
  """All tensors of a Hugging Face folder's safetensors files, by name."""

  def __init__(self, hf_dir: str | pathlib.Path):
    self.dir = pathlib.Path(hf_dir)
    index = self.dir / INDEX
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in self.dir.glob("*.safetensors"))
    if not files:
      pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
      hint = (f" (it has {', '.join(pickles[:3])}: pickle files are never loaded; save the "
              "model with safe_serialization=True)" if pickles else "")
      raise ConversionError(f"{self.dir} holds no .safetensors weights{hint}")
    self._paths: dict[str, pathlib.Path] = {}
    self.file_of: dict[str, str] = {}
    self._shapes: dict[str, tuple[int, ...]] = {}
    self._dtypes: dict[str, str] = {}
    for name in files:
      path = self.dir / name
      if not path.is_file():
        raise ConversionError(f"{path} is listed in {INDEX} but missing")
      self._paths[name] = path
      with safe_open(str(path), framework="numpy") as handle:
        for key in handle.keys():
          self.file_of[key] = name
          tensor = handle.get_slice(key)
          self._shapes[key] = tuple(tensor.get_shape())
          self._dtypes[key] = tensor.get_dtype()

  @property
  def names(self) -> list[str]:
    return sorted(self.file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._shapes[name]

  def dtype(self, name: str) -> str:
    """The safetensors dtype code, e.g. "BF16"."""
    return self._dtypes[name]

  def check_dtypes(self, names: list[str]) -> None:
    """Refuses, naming the first, a tensor whose dtype is not a float sptlm reads exactly."""
    bad = [n for n in names if self._dtypes[n] not in FLOAT_DTYPES]
    if bad:
      raise ConversionError(
          f"{self.dir}: tensor {bad[0]!r} has dtype {self._dtypes[bad[0]]} (and {len(bad) - 1} "
          f"more not {'/'.join(FLOAT_DTYPES)}): sptlm reads only unquantized float weights")

  def read(self, name: str) -> np.ndarray:
    """One tensor, copied out; the file is mapped only for this call, so nothing accumulates."""
    if name not in self.file_of:
      raise ConversionError(f"{self.dir}: tensor {name!r} is missing (not in the safetensors "
                            "files)")
    with safe_open(str(self._paths[self.file_of[name]]), framework="numpy") as handle:
      return np.array(handle.get_tensor(name), copy=True)


class ShardedWriter:
  """Writes tensors into size-limited safetensors shards plus the index Hugging Face reads."""

  def __init__(self, out_dir: pathlib.Path, max_shard_bytes: int):
    self.dir = out_dir
    self.max_shard_bytes = max_shard_bytes
    self._buffer: dict[str, np.ndarray] = {}
    self._buffer_bytes = 0
    self._shards: list[list[str]] = []
    self.total_bytes = 0
    self.peak_buffer_bytes = 0

  def add(self, name: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    if self._buffer and self._buffer_bytes + array.nbytes > self.max_shard_bytes:
      self._flush()
    self._buffer[name] = array
    self._buffer_bytes += array.nbytes
    self.total_bytes += array.nbytes
    self.peak_buffer_bytes = max(self.peak_buffer_bytes, self._buffer_bytes)

  def _flush(self) -> None:
    i = len(self._shards)
    save_file(self._buffer, str(self.dir / f"shard-{i:05d}.tmp"), metadata={"format": "pt"})
    self._shards.append(list(self._buffer))
    self._buffer, self._buffer_bytes = {}, 0

  def close(self) -> list[str]:
    """Writes the last shard, names the files, writes the index; returns the file names."""
    if self._buffer or not self._shards:
      self._flush()
    n = len(self._shards)
    if n == 1:
      (self.dir / "shard-00000.tmp").rename(self.dir / SINGLE)
      return [SINGLE]
    weight_map, files = {}, []
    for i, names in enumerate(self._shards):
      final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      (self.dir / f"shard-{i:05d}.tmp").rename(self.dir / final)
      files.append(final)
      weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(
        weight_map.items()))}
    (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files


def parse_size(text: str) -> int:
  """'5GB', '500MB', '123' (bytes) -> bytes."""
  units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
  t = text.strip().lower()
  for unit in sorted(units, key=len, reverse=True):
    if t.endswith(unit):
      number = t[: -len(unit)]
      break
  else:
    unit, number = "", t
  try:
    value = float(number) * (units[unit] if unit else 1)
  except ValueError:
    raise ConversionError(f"--max-shard-size {text!r}: use bytes or e.g. 5GB, 500MB") from None
  if value <= 0:
    raise ConversionError(f"--max-shard-size {text!r} must be positive")
  return int(value)
