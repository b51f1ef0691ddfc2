"""Training input from materialized shards: a grain mixture of the tasks, packed and batched.

(For small runs, `data.shards` may name a data config file instead: its tasks are built in
the training process by the materializer's own code, and fed the same way.)

Per data stream (data.num_shards of them; host p owns a contiguous range, as in text_input):
  each task's records, stream s taking records s, s + S, s + 2S, ... of the task (ArrayRecord
  reads by index, so a host reads only its own records), shuffled, repeated
  -> grain.MapDataset.mix with per-example weights that give each task its token share
  -> every example cut into pieces of at most seq_len + 1 tokens (shifted by one)
  -> first-fit packed to seq_len (segment ids, positions) -> batched
  -> optionally data.workers grain worker processes (mp_prefetch)
A batch has the text input's fields plus "tasks": the task (1-based index in `task_names`) of
every target position, 0 on padding, from which the train step reports a loss per task.

The iterator state (mixture position and packing buffers, per stream) goes into the
checkpoint. The mixture's state is a position, so resuming with other rates continues without
error (from the same position of the re-weighted mixture).
"""

import collections
import dataclasses
import json
import logging
from typing import Any

import grain
import numpy as np
from etils import epath

from data_pipelines import mixture, records
from data_pipelines.text_input import ShardedBatches
from data_pipelines.vocabulary import Vocabulary
from sptlm.errors import InputError, MissingFileError

log = logging.getLogger("sptlm.data")
FIELDS = ("inputs", "targets", "weights", "tasks")
# Records are local and cheap to decode: grain's default 16 read threads and 500-element
# prefetch cost 4x the work itself (polling futures) on a 2-core machine. Parallelism, when
# needed, comes from data.workers processes.
READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class MixtureStats:
  task_names: tuple[str, ...]
  token_shares: dict[str, float]  # the rates, normalised
  example_weights: dict[str, float]  # sampling probabilities that give those token shares
  examples: dict[str, int]
  tokens: int


def read_stats(shards_dir: str) -> dict[str, Any]:
  path = epath.Path(shards_dir) / "stats.json"
  if not path.exists():
    raise MissingFileError(f"{path} not found: data.shards must be the --output of a finished "
                           "`sptlm data materialize`")
  try:
    return json.loads(path.read_text())
  except ValueError:
    raise InputError(f"{path} is not JSON; re-run `sptlm data materialize` into it") from None


def task_files(shards_dir: str, name: str, shards: int) -> list[str]:
  files = [epath.Path(shards_dir) / name / f"{name}-{s:05d}-of-{shards:05d}.array_record"
           for s in range(shards)]
  missing = [f for f in files if not f.exists()]
  if missing:
    raise MissingFileError(f"shard {missing[0]} is missing ({len(missing)} of {shards} of task "
                           f"{name}); re-run `sptlm data materialize` to write it")
  return [str(f) for f in files]


SKIPPED: collections.Counter = collections.Counter()  # damaged records met in this process


class _Decode(grain.transforms.Map):
  """Record -> example; a damaged record or one with ids outside the vocabulary is skipped
  (None, filtered next), counted in SKIPPED and logged, never fed as wrong tokens."""

  def __init__(self, task: int, name: str, vocab_size: int | None):
    self.task, self.name, self.vocab_size = task, name, vocab_size

  def map(self, record: bytes) -> dict[str, np.ndarray] | None:
    try:
      ids, weights = records.decode(record, f"a record of task {self.name}")
    except InputError as e:
      return self._skip("damaged records", str(e))
    if self.vocab_size is not None and len(ids) and (ids.min() < 0 or
                                                     ids.max() >= self.vocab_size):
      return self._skip("records with ids outside the vocabulary",
                        f"a record of task {self.name} has ids outside [0, {self.vocab_size})")
    return {"ids": ids, "weights": weights, "task": np.int32(self.task)}

  def _skip(self, reason: str, detail: str) -> None:
    SKIPPED[f"{self.name}: {reason}"] += 1
    if SKIPPED[f"{self.name}: {reason}"] <= 10:
      log.warning("skipping %s (%d so far); re-materialize the task", detail,
                  SKIPPED[f"{self.name}: {reason}"])
    return None


class _Split(grain.experimental.FlatMapTransform):
  """An example -> pieces of at most seq_len + 1 tokens overlapping by one, shifted by one."""

  def __init__(self, seq_len: int):
    self.seq_len = seq_len
    self.max_fan_out = 1 << 20

  def flat_map(self, ex: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    ids, w, n = ex["ids"], ex["weights"], len(ex["ids"])
    out = []
    for start in range(0, n - 1, self.seq_len):
      end = min(start + self.seq_len + 1, n)
      if end - start < 2:
        continue
      out.append({"inputs": ids[start:end - 1], "targets": ids[start + 1:end],
                  "weights": w[start + 1:end].astype(np.float32),
                  "tasks": np.full(end - start - 1, ex["task"], np.int32)})
    return out


def _to_batch_fields(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"inputs": ex["inputs"], "targets": ex["targets"], "weights": ex["weights"],
          "tasks": ex["tasks"], "segment_ids": ex["inputs_segment_ids"].astype(np.int32),
          "positions": ex["inputs_positions"].astype(np.int32)}


def stream(sources: list[Any], names: list[str], weights: list[float], *, stream_index: int,
           num_streams: int, seq_len: int, batch: int, packing_bins: int, seed: int,
           vocab_size: int | None = None, workers: int = 0) -> grain.IterDataset:
  """One data stream: its records of every task, mixed, split, packed and batched."""
  parts = []
  for t, src in enumerate(sources):
    ds = grain.MapDataset.source(src).slice(slice(stream_index, None, num_streams))
    parts.append(ds.shuffle(seed=seed + 7919 * t).repeat(None)
                 .map(_Decode(t + 1, names[t], vocab_size)).filter(lambda e: e is not None))
  mixed = grain.MapDataset.mix(parts, weights) if len(parts) > 1 else parts[0]
  ds = grain.experimental.FlatMapIterDataset(mixed.to_iter_dataset(READ), _Split(seq_len))
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={k: seq_len for k in FIELDS}, num_packing_bins=max(packing_bins, batch),
      seed=seed, shuffle_bins=True)
  ds = ds.map(_to_batch_fields).batch(batch, drop_remainder=True)
  if workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; sptlm parses its own
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


LAYOUT_KEYS = ("text_size", "speech_size", "speech_offset", "special_offset", "special_ids")


def _layout(vocab: Any) -> dict[str, Any]:
  """The id layout a vocab section (dataclass or manifest dict) describes, keys missing from
  an older manifest at their defaults (sptlm's own layout)."""
  if isinstance(vocab, Vocabulary):
    return _model_layout(vocab)
  get = vocab.get if isinstance(vocab, dict) else lambda k, d=None: getattr(vocab, k, d)
  return {"text_size": int(get("text_size")), "speech_size": int(get("speech_size")),
          "speech_offset": int(get("speech_offset", -1)),
          "special_offset": int(get("special_offset", -1)),
          "special_ids": tuple((str(n), int(i)) for n, i in get("special_ids", ()) or ())}


def _model_layout(vocab: Vocabulary | tuple[int, int]) -> dict[str, Any]:
  if isinstance(vocab, Vocabulary):
    return {"text_size": vocab.text_size, "speech_size": vocab.speech_size,
            "speech_offset": vocab.speech_offset, "special_offset": vocab.special_offset,
            "special_ids": vocab.adopted}
  text_size, speech_size = vocab
  return {"text_size": text_size, "speech_size": speech_size}


def compare_layout(source: str, have: Any, model: Vocabulary | tuple[int, int]) -> None:
  """The data's ids must mean what the model's vocabulary says: every key of the layout, or
  only the sizes when the model gives just (text_size, speech_size)."""
  data, want = _layout(have), _model_layout(model)
  for key in LAYOUT_KEYS:
    if key in want and data[key] != want[key]:
      raise InputError(f"{source} for vocab.text_size={data['text_size']}, vocab.speech_size="
                       f"{data['speech_size']}: its vocab.{key}={data[key]!r} differs from the "
                       f"model's {want[key]!r}; set the model's vocab to match, or the data "
                       "config's (and re-materialize)")


def check_vocab(shards_dir: str, vocab: Vocabulary | tuple[int, int]) -> None:
  """The shards' ids must mean what the model's vocabulary says (manifest.json's vocab)."""
  path = epath.Path(shards_dir) / "manifest.json"
  try:
    have = json.loads(path.read_text())["config"]["vocab"]
    _layout(have)
  except FileNotFoundError:
    raise MissingFileError(f"{path} not found: data.shards must be a `sptlm data materialize` "
                           "output") from None
  except (ValueError, KeyError, TypeError):
    raise InputError(f"{path} is not a materialization manifest; re-materialize") from None
  compare_layout(f"{shards_dir} was materialized", have, vocab)


def build_in_memory(config_path: str) -> tuple[dict[str, Any], dict[str, list[bytes]],
                                                tuple[int, int]]:
  """(stats.json's tasks, records per task, (text_size, speech_size)) of a data config's
  tasks, built here with the materializer's own code: the same records, without Beam."""
  from data_pipelines import config as data_config
  from data_pipelines import examples
  cfg = data_config.load(config_path)
  builder = examples.ExampleBuilder(cfg)
  stats, built = {}, {}
  for task in cfg.tasks:
    items = list(examples.task_items(task, cfg.vocab.speech_size))
    built[task.name], st = examples.build_records(builder, task, items, cfg.interleave.batch,
                                                  task.name)
    stats[task.name] = examples.task_summary(task, [st])
  return stats, built, (cfg.vocab.text_size, cfg.vocab.speech_size)


def config_vocabulary(config_path: str) -> Vocabulary:
  """The id layout a data config's vocab section gives (its adopted keys included)."""
  from data_pipelines import config as data_config
  return Vocabulary.from_config(data_config.load(config_path).vocab)


def shard_batches(shards_dir: str, *, rates: dict[str, float] | None, seq_len: int,
                  global_batch: int, num_shards: int, packing_bins: int, seed: int,
                  vocab_sizes: tuple[int, int] | Vocabulary | None = None, workers: int = 0,
                  process_index: int = 0,
                  process_count: int = 1) -> tuple[ShardedBatches, MixtureStats]:
  """This host's rows of each global batch from a materialized directory's tasks, or (for
  small runs) straight from a data config's tasks, built in this process (`shards_dir` a .py).

  `rates` ({task: token share}) overrides the rates the data config gave at materialization
  for the tasks it names; rate 0 leaves a task out. `vocab_sizes`: the model's Vocabulary,
  whose whole layout the data must share, or just its (text_size, speech_size).
  """
  if num_shards % process_count or global_batch % num_shards:
    raise InputError(f"data.num_shards={num_shards} must be a multiple of the {process_count} "
                     f"processes and divide data.global_batch_size={global_batch}")
  if "://" in shards_dir:
    raise InputError(f"data.shards={shards_dir}: ArrayRecord shards are read from a local or "
                     "mounted directory; mount the bucket (gcsfuse, as TPU VMs do) and give "
                     "that path")
  if shards_dir.endswith(".py"):
    stats, built, _ = build_in_memory(shards_dir)
    if vocab_sizes is not None:
      compare_layout(f"data config {shards_dir} is", config_vocabulary(shards_dir), vocab_sizes)
  else:
    if vocab_sizes is not None:
      check_vocab(shards_dir, vocab_sizes)
    stats, built = read_stats(shards_dir)["tasks"], None
  unknown = sorted(set(rates or {}) - set(stats))
  if unknown:
    raise InputError(f"data.rates names task {unknown[0]!r}, which {shards_dir} does not hold "
                     f"(it has: {', '.join(stats)})")
  chosen = {k: float((rates or {}).get(k, t["rate"])) for k, t in stats.items()}
  chosen = {k: r for k, r in chosen.items() if r > 0}
  if not chosen:
    raise InputError("data.rates gives every task rate 0; give at least one a positive rate")
  for name in chosen:
    if stats[name]["examples"] < num_shards:
      raise InputError(f"task {name} in {shards_dir} has {stats[name]['examples']} examples, "
                       f"fewer than data.num_shards={num_shards}")
  names = tuple(chosen)
  weights = mixture.example_weights(chosen, {k: stats[k]["tokens per example"] for k in names})
  sources = [built[k] if built else
             grain.sources.ArrayRecordDataSource(task_files(shards_dir, k, stats[k]["shards"]))
             for k in names]
  per_host = num_shards // process_count
  owned = range(process_index * per_host, (process_index + 1) * per_host)
  if vocab_sizes is None:
    vocab_size = None
  elif isinstance(vocab_sizes, Vocabulary):
    vocab_size = vocab_sizes.size
  else:
    vocab_size = Vocabulary(*vocab_sizes).size
  streams = {s: stream(sources, list(names), [weights[k] for k in names], stream_index=s,
                       num_streams=num_shards, seq_len=seq_len, batch=global_batch // num_shards,
                       packing_bins=packing_bins, seed=seed * 1_000_003 + s,
                       vocab_size=vocab_size, workers=workers)
             for s in owned}
  summary = MixtureStats(names, mixture.token_shares(chosen), weights,
                         {k: stats[k]["examples"] for k in names},
                         int(sum(stats[k]["tokens"] for k in names)))
  return ShardedBatches(streams), summary
