"""Training input for the tokenizer: utterances bucketed by length, read and featurized on the
fly (log-mel costs about 2% of a train step), batched through grain with checkpointable state.

Each bucket has one padded length (data.bucket_seconds), so the step compiles once per bucket.
A batch holds data.batch_seconds of padded audio. The batch plan (which utterances go together,
in which order, reshuffled every epoch) is fixed by the seed, and the grain iterator's position
in it is saved with every checkpoint: a resumed run sees exactly the batches it would have.
With data.augment enabled, training audio goes through sptlm.speech.augment first, with a
generator keyed by (seed, batch index, utterance): resumed runs see the same audio too. Only
`train_iterator` augments; evaluation reads its audio unchanged. Without augmentation, a slow
front end's features can be kept per clip on disk (sptlm.speech.feature_cache).

Batch fields ([B, ...] numpy arrays, this process's rows only):
  mel [B, 8N, M] float32 (zero past the audio), valid [B, N] int32 (1 inside the audio),
  labels [B, N * up] int32 (CTC classes, 0-padded), label_paddings [B, N * up] float32
  (1.0 = padding), where up = model.ctc_upsample; engine [B] int32 (the utterance's TTS
  engine as an index into sptlm.speech.engines.ADVERSARY_ENGINES, -1 when it names none).
"""

import dataclasses
import logging
import math
from collections.abc import Sequence

import grain
import numpy as np
import scipy.io.wavfile

from sptlm.errors import InputError
from sptlm.speech import augment as augment_lib
from sptlm.speech import feature_cache, features, voice_change
from sptlm.speech.augment import AugmentConfig
from sptlm.speech.engines import ADVERSARY_ENGINES
from sptlm.speech.feature_cache import FeatureCache
from sptlm.speech.manifest import ManifestSource, Utterance
from sptlm.speech.units import Units, ctc_frames_needed

log = logging.getLogger(__name__)
TOKENS_PER_SECOND = features.SAMPLE_RATE / features.SAMPLES_PER_TOKEN  # 12.5
AUGMENT_STREAM = 1  # keys augmentation apart from the batch plan's default_rng([seed, epoch])
FEATURE_STREAM = 2  # and the feature effects (warp, masks) apart from the audio chain
VOICE_STREAM = 3  # and the voice change (before the chain) apart from both


def num_tokens(num_samples: int) -> int:
  """Tokens of an utterance: one per started 80 ms (the tail is zero-padded, never dropped)."""
  return -(-num_samples // features.SAMPLES_PER_TOKEN)


def duration(source: ManifestSource, utt: Utterance) -> float:
  """Seconds of audio: from the manifest when it says, else from the WAV header."""
  if utt.seconds > 0:
    return utt.seconds
  rate, data = scipy.io.wavfile.read(source.path(utt), mmap=True)
  return len(data) / rate


def engine_class(name: str) -> int:
  """The engine adversary's class of a manifest `engine` (-1: none it knows, left out)."""
  return ADVERSARY_ENGINES.index(name) if name in ADVERSARY_ENGINES else -1


@dataclasses.dataclass(frozen=True)
class Prepared:
  """The usable utterances of a split with their token counts and CTC labels."""

  utts: list[Utterance]
  tokens: np.ndarray  # [U] int
  labels: list[np.ndarray]
  skipped_long: int
  skipped_dense: int  # transcripts with more CTC units than CTC frames

  @property
  def hours(self) -> float:
    return float(self.tokens.sum()) / TOKENS_PER_SECOND / 3600


def prepare(source: ManifestSource, split: str, units: Units, max_tokens: int,
            ctc_upsample: int = 1) -> Prepared:
  utts, tokens, labels = [], [], []
  long = dense = 0
  for u in source.utterances(split):
    n = num_tokens(round(duration(source, u) * features.SAMPLE_RATE))
    lab = units.labels(u.text)
    if n > max_tokens:
      long += 1
    elif ctc_frames_needed(lab) > n * ctc_upsample or not len(lab):
      dense += 1
    else:
      utts.append(u)
      tokens.append(n)
      labels.append(lab)
  if not utts:
    raise InputError(f"split {split!r} of {source.name} has no usable utterance ({long} longer "
                     f"than the longest bucket, {dense} with empty or too dense transcripts)")
  return Prepared(utts, np.asarray(tokens), labels, long, dense)


def bucket_shapes(bucket_seconds: Sequence[float], batch_seconds: float,
                  multiple: int) -> list[tuple[int, int]]:
  """(batch size, tokens) per bucket; batch sizes are multiples of the data-parallel size."""
  shapes = []
  for sec in bucket_seconds:
    n = max(1, round(sec * TOKENS_PER_SECOND))
    b = max(multiple, int(batch_seconds / (n / TOKENS_PER_SECOND)) // multiple * multiple)
    shapes.append((b, n))
  return shapes


def plan_batches(tokens: np.ndarray, shapes: list[tuple[int, int]], *, seed: int,
                 epochs: int, short_first: bool = False) -> list[tuple[int, tuple[int, ...]]]:
  """[(bucket, utterance indices)] for `epochs` epochs; each epoch reshuffled. With
  `short_first`, the first epoch goes through the buckets from the shortest up (SortaGrad,
  Amodei et al. 2016): CTC finds its alignments sooner on short utterances."""
  bucket_of = np.searchsorted([n for _, n in shapes], tokens)
  plan = []
  for epoch in range(epochs):
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for k, (b, _) in enumerate(shapes):
      members = rng.permutation(np.flatnonzero(bucket_of == k))
      for start in range(0, len(members) - b + 1, b):  # drop the ragged end: next epoch differs
        batches.append((k, tuple(int(i) for i in members[start:start + b])))
    order = rng.permutation(len(batches))
    if short_first and epoch == 0:
      order = sorted(order, key=lambda i: batches[i][0])
    plan.extend(batches[i] for i in order)
  return plan


class _Loader:
  """Batch plan entry -> numpy batch (this process's rows)."""

  def __init__(self, source: ManifestSource, data: Prepared, shapes: list[tuple[int, int]],
               num_mels: int, ctc_upsample: int, process_index: int, process_count: int,
               frontend: str = "whisper_mel", cache: FeatureCache | None = None):
    self.source, self.data, self.shapes = source, data, shapes
    self.num_mels, self.up, self.frontend = num_mels, ctc_upsample, frontend
    self.pi, self.pc = process_index, process_count
    self.cache = cache

  def __call__(self, entry: tuple[int, tuple[int, ...]]) -> dict[str, np.ndarray]:
    bucket, members = entry
    b, n = self.shapes[bucket]
    rows = members[self.pi * b // self.pc:(self.pi + 1) * b // self.pc]
    utts = [self.data.utts[i] for i in rows]
    audios = [self.source.load(u) for u in utts]
    feats = None if self.cache is None else [
        self.cache.get(self.source.path(u), x) for u, x in zip(utts, audios)]
    return make_batch(audios, [self.data.labels[i] for i in rows], n, self.num_mels,
                      n * self.up, [engine_class(u.engine) for u in utts], self.frontend,
                      feats)


class _AugmentingLoader:
  """(plan position, entry) -> batch of augmented audio; speed perturbation keeps each
  utterance inside its bucket and long enough for the CTC frames of its transcript."""

  def __init__(self, base: _Loader, augment: AugmentConfig, seed: int):
    self.base, self.augment, self.seed = base, augment, seed

  def __call__(self, index: int, entry: tuple[int, tuple[int, ...]]) -> dict[str, np.ndarray]:
    base = self.base
    bucket, members = entry
    b, n = base.shapes[bucket]
    rows = members[base.pi * b // base.pc:(base.pi + 1) * b // base.pc]
    audios, clean = [], []
    for i in rows:
      min_tokens = -(-ctc_frames_needed(base.data.labels[i]) // base.up)
      bounds = dict(min_samples=(min_tokens - 1) * features.SAMPLES_PER_TOKEN + 1,
                    max_samples=n * features.SAMPLES_PER_TOKEN)
      x = base.source.load(base.data.utts[i])
      if self.augment.voice_prob:
        x = voice_change.random_voice(
            x, self.augment, np.random.default_rng([self.seed, VOICE_STREAM, index, i]), **bounds)
      if self.augment.mel_only:  # Moonshine's part from the clean audio, cached or not
        clean.append(feature_cache.clip_features(x, *feature_cache.CACHED[base.frontend])
                     if base.cache is None else
                     base.cache.get(base.source.path(base.data.utts[i]), x))
      rng = np.random.default_rng([self.seed, AUGMENT_STREAM, index, i])
      audios.append(augment_lib.augment(x, self.augment, rng, **bounds))
    batch = make_batch(audios, [base.data.labels[i] for i in rows], n, base.num_mels,
                       n * base.up, [engine_class(base.data.utts[i].engine) for i in rows],
                       base.frontend, clean or None)
    if augment_lib.features_enabled(self.augment):
      for r, (i, x) in enumerate(zip(rows, audios)):
        rng = np.random.default_rng([self.seed, FEATURE_STREAM, index, i])
        frames = features.num_frames(min(len(x), n * features.SAMPLES_PER_TOKEN))
        batch["mel"][r] = augment_lib.augment_features(batch["mel"][r], frames, self.augment, rng)
    return batch


def make_batch(audios: Sequence[np.ndarray], labels: Sequence[np.ndarray], n: int,
               num_mels: int, label_len: int,
               engines: Sequence[int] | None = None,
               frontend: str = "whisper_mel",
               feats: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Pads audio to N tokens each and featurizes in one batched call (or takes each clip's
  features from `feats`, as FeatureCache.get gives them)."""
  b = len(audios)
  engine = np.full((b,), -1, np.int32) if engines is None else np.asarray(engines, np.int32)
  samples = np.zeros((b, n * features.SAMPLES_PER_TOKEN), np.float32)
  valid = np.zeros((b, n), np.int32)
  lab = np.zeros((b, label_len), np.int32)
  lab_pad = np.ones((b, label_len), np.float32)
  for r, (x, y) in enumerate(zip(audios, labels)):
    x = x[:n * features.SAMPLES_PER_TOKEN]
    samples[r, :len(x)] = x
    valid[r, :num_tokens(len(x))] = 1
    lab[r, :len(y)] = y
    lab_pad[r, :len(y)] = 0.0
  lengths = [min(len(x), n * features.SAMPLES_PER_TOKEN) for x in audios]
  if feats is None:
    mel = features.featurize(samples, num_mels, frontend, np.asarray(lengths))
  else:  # the cached part (Moonshine's), completed as featurize would (features.with_mel)
    mel = np.zeros((b, n * features.FRAMES_PER_TOKEN, feats[0].shape[-1]), np.float32)
    for r, f in enumerate(feats):
      mel[r, :len(f)] = f[:n * features.FRAMES_PER_TOKEN]
    mel = features.with_mel(mel, samples, frontend)
  mel *= np.repeat(valid, features.FRAMES_PER_TOKEN, axis=1)[:, :, None]
  return {"mel": mel, "valid": valid, "labels": lab, "label_paddings": lab_pad,
          "engine": engine}


def train_iterator(source: ManifestSource, data: Prepared, shapes: list[tuple[int, int]], *,
                   steps: int, seed: int, num_mels: int, ctc_upsample: int = 1,
                   short_first: bool = False, process_index: int = 0,
                   process_count: int = 1,
                   augment: AugmentConfig = AugmentConfig(),
                   frontend: str = "whisper_mel",
                   cache: FeatureCache | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator over `steps` (or more) batches; `augment` (data.augment, the
  training split only) is off by default; `cache` keeps each clip's features (only without
  augmentation, whose audio differs every time, or with `augment.mel_only`: the cached part is
  the clean audio's, the log-mel the augmented audio's)."""
  if cache is not None and augment.enabled and not augment.mel_only:
    raise ValueError("a feature cache needs the same audio every epoch: data.augment is on "
                     "(data.augment.mel_only keeps the cached features clean)")
  if augment.enabled and augment.mel_only and frontend != "moonshine_tiny_mel":
    raise ValueError(f"data.augment.mel_only needs the moonshine_tiny_mel front end, not "
                     f"{frontend!r}")
  if augment.enabled and augment.mel_only and (augment.speed_prob or augment.voice_prob):
    raise ValueError("data.augment.mel_only needs audio that keeps its length: set "
                     "speed_prob=0 and voice_prob=0")
  per_epoch = len(plan_batches(data.tokens, shapes, seed=seed, epochs=1))
  if per_epoch == 0:
    raise InputError(f"{len(data.utts)} utterances do not fill one batch of any bucket; lower "
                     "data.batch_seconds")
  plan = plan_batches(data.tokens, shapes, seed=seed, epochs=math.ceil(steps / per_epoch) + 1,
                      short_first=short_first)
  loader = _Loader(source, data, shapes, num_mels, ctc_upsample, process_index, process_count,
                   frontend, cache)
  if augment.enabled:
    ds = grain.MapDataset.source(plan).map_with_index(_AugmentingLoader(loader, augment, seed))
  else:
    ds = grain.MapDataset.source(plan).map(loader)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
