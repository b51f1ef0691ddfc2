"""Each training clip's input features kept on disk, for a front end that costs about as much as
the train step itself and audio that is the same every epoch.

model.frontend='moonshine_tiny' (and '_mel') runs Moonshine's encoder in the input pipeline:
about 0.29 CPU seconds per 32 s batch on this project's 2-core reference machine (0.007 read
back; the tiny recipe trains at 2.09 steps/s instead of 1.78, BENCHMARKS.md). With data.augment
off a clip's features never change, so after the first epoch they are read back instead
(`data.cache_features`). A clip is featurized alone, padded to its last whole token;
Moonshine's features of a clip are the same alone and in a padded batch,
so a batch from the cache equals the batch computed directly, bit for bit.

Files are keyed by the audio file (resolved path, size, modification time), the front end and
its width, written to a temporary name and renamed, and recomputed when unreadable or of the
wrong shape: a partial or corrupt file never reaches a batch. If the directory cannot be
written (disk full, read-only), training goes on without the cache after one warning.
"""

import hashlib
import logging
import os
import pathlib
import threading

import numpy as np

from sptlm.speech import features

log = logging.getLogger(__name__)
# np.load parses each header with ast.literal_eval, and CPython 3.11's AST constructor can fail
# when two threads (grain's loaders) parse at once (python/cpython#106905): "SystemError: AST
# constructor recursion depth mismatch" ended a training run. Reads are 0.007 s a batch, so
# one at a time costs little.
_LOAD_LOCK = threading.Lock()
# model.frontend -> the slow part of its features that is cached: (front end, width). The
# others cost about 2% of a step: not worth the disk. "moonshine_tiny_mel" appends the log-mel
# to Moonshine's features in the batch (features.with_mel), so both share one cache.
CACHED = {"moonshine_tiny": ("moonshine_tiny", features.MOONSHINE_DIM),
          "moonshine_tiny_mel": ("moonshine_tiny", features.MOONSHINE_DIM)}


def bytes_per_second(num_mels: int) -> int:
  """Disk a second of audio takes in the cache (float32 at 100 Hz)."""
  return 4 * num_mels * features.SAMPLE_RATE // features.HOP


def clip_features(samples: np.ndarray, frontend: str, num_mels: int) -> np.ndarray:
  """[8 * tokens, num_mels] features of one clip, padded to whole tokens: what the cache keeps."""
  tokens = -(-len(samples) // features.SAMPLES_PER_TOKEN)
  padded = np.zeros((1, tokens * features.SAMPLES_PER_TOKEN), np.float32)
  padded[0, :len(samples)] = samples
  return features.featurize(padded, num_mels, frontend, np.asarray([len(samples)]))[0]


class FeatureCache:
  """Features of whole clips by audio file; thread-safe (grain's loader threads share one)."""

  def __init__(self, directory: pathlib.Path, frontend: str, num_mels: int):
    self.directory, self.frontend, self.num_mels = pathlib.Path(directory), frontend, num_mels
    self.hits = self.misses = self.recomputed = 0
    self._lock = threading.Lock()
    self._writable = True

  def _file(self, path: pathlib.Path) -> pathlib.Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.frontend}|{self.num_mels}"
    digest = hashlib.sha1(key.encode()).hexdigest()
    return self.directory / digest[:2] / f"{digest}.npy"

  def get(self, path: pathlib.Path, samples: np.ndarray) -> np.ndarray:
    """[8 * tokens, num_mels] float32 features of the clip `samples` read from `path`."""
    tokens = -(-len(samples) // features.SAMPLES_PER_TOKEN)
    shape = (tokens * features.FRAMES_PER_TOKEN, self.num_mels)
    file = self._file(path)
    stale = False
    if file.exists():
      try:
        with _LOAD_LOCK:
          got = np.load(file, allow_pickle=False)
        if got.shape == shape and got.dtype == np.float32:
          with self._lock:
            self.hits += 1
          return got
      except (OSError, ValueError, EOFError):
        pass
      stale = True
    feats = clip_features(samples, self.frontend, self.num_mels)
    with self._lock:
      self.misses += 1
      self.recomputed += stale
    self._write(file, feats)
    return feats

  def _write(self, file: pathlib.Path, feats: np.ndarray) -> None:
    if not self._writable:
      return
    tmp = file.with_name(f"{file.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npy")
    try:
      file.parent.mkdir(parents=True, exist_ok=True)
      np.save(tmp, feats, allow_pickle=False)
      os.replace(tmp, file)
    except OSError as e:
      with self._lock:
        was, self._writable = self._writable, False
      if was:
        log.warning("feature cache %s cannot be written (%s): going on without it",
                    self.directory, e.strerror or e)
      try:
        tmp.unlink(missing_ok=True)
      except OSError:
        pass  # its directory was never made
