"""`sptlm data materialize`: a data config's tasks, preprocessed, as ArrayRecord shards (Beam).

Pipeline (the same on the DirectRunner here and on Dataflow, Flink or Spark by runner flags):
  files -> read items (documents or token records), each keyed to a shard by a hash of its
  (file, line) position -> GroupByKey(shard) -> per shard, in Beam workers: build examples in
  fixed batches (the tokenizer and text-to-token model load once per worker, in DoFn.setup),
  write the shard.

Why the output is byte-identical for any worker count: an item's shard depends only on its
position, a shard's items are sorted by position, and its batches for the text-to-token model
are fixed chunks of that order (Beam's adaptive BatchElements would make batch composition
depend on timing), and interleaving is seeded per document.

Output directory:
  manifest.json                 the resolved data config and format; a re-run must match it
  TASK/TASK-00003-of-00008.array_record   one example per record (records.py)
  TASK/TASK-00003-of-00008.stats.json     that shard's counts (tokens, speech, skipped)
  stats.json                    every shard's counts summed per task, and tokens per example
A shard is written under a temporary name and renamed when complete (on gs://: uploaded in
one piece, which is atomic), so a killed run keeps every finished shard and leaves no partial
one under a final name; a re-run skips finished shards.
"""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from etils import epath

from data_pipelines import examples, sources
from data_pipelines.config import TEXT_KINDS, DataPipelineConfig, TaskSpec
from sptlm.errors import InputError

log = logging.getLogger("sptlm.data")
FORMAT = "sptlm-shards-1"


def shard_name(task: TaskSpec, shard: int) -> str:
  return f"{task.name}-{shard:05d}-of-{task.shards:05d}"


def shard_path(output: epath.Path, task: TaskSpec, shard: int) -> epath.Path:
  return output / task.name / f"{shard_name(task, shard)}.array_record"


def shard_of(task: TaskSpec, file_index: int, item_index: int) -> int:
  key = f"{task.name}:{file_index}:{item_index}".encode()
  return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % task.shards


# vocab keys added after manifests were first written, with the values they then implied
ADDED_VOCAB_KEYS = {"speech_offset": -1, "special_offset": -1, "special_ids": []}


def _manifest(cfg: DataPipelineConfig) -> dict[str, Any]:
  return {"format": FORMAT, "config": dataclasses.asdict(cfg)}


def check_manifest(output: epath.Path, cfg: DataPipelineConfig) -> None:
  """Writes OUTPUT/manifest.json, or checks that a re-run uses the same config."""
  path = output / "manifest.json"
  want = _manifest(cfg)
  if path.exists():
    try:
      have = json.loads(path.read_text())
    except ValueError:
      raise InputError(f"{path} is not JSON; is {output} a materialized data directory?") from None
    for key, default in ADDED_VOCAB_KEYS.items():  # manifests written before these keys
      have.get("config", {}).get("vocab", {}).setdefault(key, default)
    if json.loads(json.dumps(want)) != have:
      raise InputError(f"{output} was materialized from another data config; use a new "
                       "--output, or rerun with the config in its manifest.json")
    return
  output.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(want, indent=1))


def _read_file(element: tuple[int, int], cfg: DataPipelineConfig,
               todo: dict[str, set[int]]) -> Iterator[tuple[tuple[str, int], tuple]]:
  """((task, shard), (file index, item index, item or Skipped)) for one file of one task."""
  task_index, file_index = element
  task = cfg.tasks[task_index]
  name = task.files[file_index]
  if task.kind in TEXT_KINDS:
    items = sources.file_documents(name)
  else:
    items = sources.file_token_records(name, cfg.vocab.speech_size, need_text=task.kind != "speech")
  for i, item in enumerate(items):  # a missing or non-UTF-8 file is one Skipped at index 0
    shard = shard_of(task, file_index, i)
    if shard in todo[task.name]:
      yield (task.name, shard), (file_index, i, item)


def _write_array_record(final: epath.Path, payloads: Iterable[bytes]) -> None:
  """Writes under a temporary name next to `final`, then renames: the final name only ever
  holds a complete shard. On gs:// the shard is written to a local temporary file and uploaded
  to its final name in one upload: an object appears only once its upload completes."""
  from array_record.python.array_record_module import ArrayRecordWriter
  remote = "://" in str(final)
  local_dir = tempfile.gettempdir() if remote else str(final.parent)
  local = os.path.join(local_dir, f".tmp-{final.name}-{uuid.uuid4().hex}")
  try:
    writer = ArrayRecordWriter(local, "group_size:1")
    try:
      for p in payloads:
        writer.write(p)
    finally:
      writer.close()
    if remote:
      with open(local, "rb") as src, final.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
    else:
      os.replace(local, final)
  finally:
    if os.path.exists(local):
      os.remove(local)


class BuildShard(beam.DoFn):
  """Examples of one shard, built and written by one worker."""

  def __init__(self, cfg: DataPipelineConfig, output: str):
    super().__init__()
    self.cfg, self.output = cfg, output
    self.builder = None

  def setup(self) -> None:
    from data_pipelines.examples import ExampleBuilder
    self.builder = ExampleBuilder(self.cfg)  # once per worker: tokenizer, t2t model

  def process(self, element: tuple[tuple[str, int], Iterable[tuple]]) -> Iterator[str]:
    (task_name, shard), items = element
    task = next(t for t in self.cfg.tasks if t.name == task_name)
    final = shard_path(epath.Path(self.output), task, shard)
    items = [item for _, _, item in sorted(items, key=lambda x: (x[0], x[1]))]
    payloads, stats = examples.build_records(self.builder, task, items, self.cfg.interleave.batch,
                                    final.stem)
    stats = {"task": task.name, "shard": shard, **stats}
    final.with_suffix(".stats.json").write_text(json.dumps(stats, indent=1))
    _write_array_record(final, payloads)
    log.info("wrote %s: %d examples", final.name, stats.get("examples", 0))
    yield final.name


def empty_shard_stats(task: TaskSpec, shard: int) -> dict[str, Any]:
  return {"task": task.name, "shard": shard, "items": 0, "skipped": {}}


def summarize(output: epath.Path, cfg: DataPipelineConfig) -> dict[str, Any]:
  """stats.json: the shards' statistics summed per task (and tokens per example)."""
  tasks = {task.name: examples.task_summary(task, [
      json.loads(shard_path(output, task, s).with_suffix(".stats.json").read_text())
      for s in range(task.shards)]) for task in cfg.tasks}
  stats = {"format": FORMAT, "tasks": tasks}
  (output / "stats.json").write_text(json.dumps(stats, indent=1))
  return stats


def materialize(cfg: DataPipelineConfig, output: str, num_workers: int = 1,
                beam_args: Sequence[str] = ()) -> dict[str, Any]:
  """Runs the Beam pipeline for the shards not yet written; returns stats.json's content."""
  out = epath.Path(output)
  check_manifest(out, cfg)
  todo = {t.name: {s for s in range(t.shards) if not shard_path(out, t, s).exists()}
          for t in cfg.tasks}
  for t in cfg.tasks:
    (out / t.name).mkdir(parents=True, exist_ok=True)
  n_todo = sum(len(v) for v in todo.values())
  n_all = sum(t.shards for t in cfg.tasks)
  print(f"sptlm data materialize: {n_todo} of {n_all} shards to write "
        f"({n_all - n_todo} finished already) into {out}", flush=True)
  if n_todo:
    options = {"direct_num_workers": num_workers,
               "direct_running_mode": "multi_processing" if num_workers > 1 else "in_memory"}
    files = [(ti, fi) for ti, t in enumerate(cfg.tasks) for fi in range(len(t.files))
             if todo[t.name]]
    with beam.Pipeline(options=PipelineOptions(list(beam_args), **options)) as p:
      _ = (p
           | "Files" >> beam.Create(files)
           | "Read" >> beam.FlatMap(_read_file, cfg, todo)
           | "ByShard" >> beam.GroupByKey()
           | "BuildAndWrite" >> beam.ParDo(BuildShard(cfg, str(out))))
  for t in cfg.tasks:  # shards no item hashed to: empty, so every name exists
    for s in todo[t.name]:
      final = shard_path(out, t, s)
      if not final.exists():
        final.with_suffix(".stats.json").write_text(json.dumps(empty_shard_stats(t, s)))
        _write_array_record(final, [])
  return summarize(out, cfg)
