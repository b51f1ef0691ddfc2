"""`sptlm data materialize` (Beam -> ArrayRecord) and the grain mixture input over its shards:
identical shards for 1 and 2 workers, re-runs skip finished shards, no partial shard under a
final name, mixture token shares, exact resume (also on another number of hosts), per-task
losses in training, bad input refused in one line."""

import filecmp
import json
import pathlib
import shutil

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from data_pipelines import materialize, mixture, mixture_input, records  # noqa: E402
from sptlm import cli  # noqa: E402
from sptlm.errors import InputError, MissingFileError  # noqa: E402
from t2t_synthetic import K, ROOT, _codes, _sentences, data_config  # noqa: E402

def _write_inputs(root: pathlib.Path) -> dict[str, pathlib.Path]:
  docs = root / "docs.txt"
  docs.write_text("\n\n".join(". ".join(_sentences(8, 100 + i)) + "." for i in range(48))
                  + "\n\n   \n\n")
  jsonl = root / "more.jsonl"
  jsonl.write_text("\n".join([json.dumps({"text": ". ".join(_sentences(5, 300 + i))})
                              for i in range(16)] + ["{broken", json.dumps({"text": 7})]) + "\n")
  pairs = root / "pairs.jsonl"
  texts = _sentences(80, 7)
  pairs.write_text("\n".join([json.dumps({"text": t, "tokens": _codes(t).tolist()})
                              for t in texts] + [json.dumps({"text": "x", "tokens": [K]})]) + "\n")
  speech = root / "speech.jsonl"
  speech.write_text("\n".join(json.dumps({"tokens": _codes(t).tolist()}) for t in texts) + "\n")
  return {"docs": docs, "jsonl": jsonl, "pairs": pairs, "speech": speech}


def _config(root: pathlib.Path, t2t: pathlib.Path, files: dict[str, pathlib.Path]) -> pathlib.Path:
  return data_config(root / "data.py", t2t, f"""{{
      "text": dict(kind="text", files=("{files['docs']}", "{root / 'missing.txt'}"), rate=30.0,
                   shards=3),
      "interleaved": dict(kind="interleaved", files=("{files['docs']}", "{files['jsonl']}"),
                          rate=60.0, shards=3),
      "speech": dict(kind="speech", files=("{files['speech']}",), rate=4.0, shards=2),
      "asr": dict(kind="asr", files=("{files['pairs']}",), rate=3.0, shards=2),
      "tts": dict(kind="tts", files=("{files['pairs']}",), rate=3.0, shards=2),
  }}""")


@pytest.fixture(scope="module")
def shards(trained_t2t, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """(config, output) of a 1-worker materialization through the CLI."""
  root = tmp_path_factory.mktemp("materialize")
  config = _config(root, trained_t2t, _write_inputs(root))
  out = root / "out1"
  assert cli.main(["data", "materialize", "--config", str(config), "--output", str(out)]) == 0
  return config, out


def test_two_workers_write_the_same_bytes_and_a_rerun_redoes_only_missing_shards(shards,
                                                                                tmp_path):
  config, out1 = shards
  out2 = tmp_path / "out2"
  assert cli.main(["data", "materialize", "--config", str(config), "--output", str(out2),
                   "--num-workers", "2"]) == 0
  names = sorted(p.relative_to(out1) for p in out1.rglob("*") if p.is_file())
  assert len([n for n in names if n.suffix == ".array_record"]) == 12
  assert names == sorted(p.relative_to(out2) for p in out2.rglob("*") if p.is_file())
  _, mismatch, errors = filecmp.cmpfiles(out1, out2, [str(n) for n in names], shallow=False)
  assert not mismatch and not errors

  # a killed run: one shard gone (and its stats), a leftover temporary file; re-run
  gone = out2 / "interleaved" / "interleaved-00001-of-00003.array_record"
  gone.unlink()
  gone.with_suffix(".stats.json").unlink()
  (out2 / "interleaved" / ".tmp-interleaved-00001-of-00003.array_record-dead").write_bytes(b"x")
  before = {n: (out2 / n).stat().st_mtime_ns for n in names if (out2 / n).exists()}
  assert cli.main(["data", "materialize", "--config", str(config), "--output", str(out2)]) == 0
  assert filecmp.cmp(gone, out1 / gone.relative_to(out2), shallow=False)
  untouched = [n for n in before if n.suffix == ".array_record"]
  assert all((out2 / n).stat().st_mtime_ns == before[n] for n in untouched)


def test_statistics_count_what_was_kept_and_skipped(shards):
  _, out = shards
  stats = json.loads((out / "stats.json").read_text())["tasks"]
  assert stats["text"]["examples"] == 48 and stats["text"]["skipped"] == {"missing files": 1}
  inter = stats["interleaved"]
  assert inter["examples"] == 48 + 16 and inter["skipped"] == {"unreadable lines": 2}
  assert 0.30 <= inter["spoken fraction"] < 0.33  # eta, rounded up per document
  assert inter["speech tokens"] > 0.2 * inter["tokens"]
  assert stats["asr"]["skipped"] == {"records with speech codes outside the codebook": 1}
  assert stats["speech"]["examples"] == 80 and stats["speech"]["speech tokens"] > 0
  # ASR: the loss is on the transcript only; TTS: on the speech only
  assert stats["asr"]["loss tokens"] < stats["asr"]["tokens"] - stats["asr"]["speech tokens"] + 1
  assert stats["tts"]["loss tokens"] == stats["tts"]["speech tokens"] + stats["tts"]["examples"]


def test_a_shard_write_that_fails_leaves_no_file_under_its_final_name(tmp_path):
  final = tmp_path / "t-00000-of-00001.array_record"

  def payloads():
    yield records.encode(np.arange(3), np.ones(3))
    raise OSError("disk gone")

  with pytest.raises(OSError):
    materialize._write_array_record(final, payloads())
  assert not final.exists()


def test_a_rerun_with_another_config_is_refused(shards, capsys):
  config, out = shards
  assert cli.main(["data", "materialize", "--config", str(config), "--output", str(out),
                   "--config.interleave.seed=5"]) == 1
  assert "materialized from another data config" in capsys.readouterr().err


def _batches(out: pathlib.Path, n: int, **kw) -> tuple[list[dict], object]:
  args = dict(rates=None, seq_len=64, global_batch=4, num_shards=2, packing_bins=8, seed=0)
  args.update(kw)
  it, stats = mixture_input.shard_batches(str(out), **args)
  return [next(it) for _ in range(n)], (it, stats)


def test_the_mixture_gives_each_task_its_token_share(shards):
  _, out = shards
  batches, (_, stats) = _batches(out, 300)
  tasks = np.concatenate([b["tasks"].ravel() for b in batches])
  tasks = tasks[tasks > 0]
  got = {name: float(np.mean(tasks == i + 1)) for i, name in enumerate(stats.task_names)}
  want = mixture.token_shares({"text": 30, "interleaved": 60, "speech": 4, "asr": 3, "tts": 3})
  for name, share in want.items():
    assert abs(got[name] - share) < 0.25 * share + 0.01, (name, got, want)
  b = batches[0]
  assert set(b) == {"inputs", "targets", "weights", "tasks", "segment_ids", "positions"}
  assert b["inputs"].shape == (4, 64) and ((b["segment_ids"] == 0) == (b["tasks"] == 0)).all()


def test_resume_is_exact_on_the_same_and_on_another_number_of_hosts(shards):
  _, out = shards
  _, (it, _) = _batches(out, 5)
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  _, (again, _) = _batches(out, 0)
  again.set_state(state)
  for a, b in zip(want, [next(again) for _ in range(4)]):
    assert all((a[k] == b[k]).all() for k in a)

  # two hosts (one data stream each) save; one host resumes both streams
  hosts = [_batches(out, 3, process_index=p, process_count=2)[1][0] for p in range(2)]
  states = [h.get_state() for h in hosts]
  nxt = [next(h) for h in hosts]
  _, (single, _) = _batches(out, 0)
  single.set_states(states)
  got = next(single)
  for k in got:
    assert (got[k] == np.concatenate([nxt[0][k], nxt[1][k]])).all()

  # other rates: continues from the saved position without error
  _, (reweighted, _) = _batches(out, 0, rates={"text": 90.0, "speech": 0.0})
  reweighted.set_states(states)
  assert next(reweighted)["inputs"].shape == (4, 64)
  with pytest.raises(InputError, match="data.num_shards"):
    _batches(out, 0, num_shards=4)[1][0].set_states(states)


def test_bad_shards_and_settings_are_one_line_errors(shards, tmp_path):
  _, out = shards
  with pytest.raises(InputError, match="rates names task 'nope'"):
    _batches(out, 0, rates={"nope": 1.0})
  with pytest.raises(InputError, match="materialized for vocab.text_size=1024"):
    _batches(out, 0, vocab_sizes=(1024, 512))
  with pytest.raises(MissingFileError, match="stats.json not found"):
    _batches(tmp_path, 0)
  with pytest.raises(InputError, match="mount the bucket"):
    mixture_input.shard_batches("gs://bkt/mixture", rates=None, seq_len=64, global_batch=4,
                                num_shards=2, packing_bins=8, seed=0)
  with pytest.raises(InputError, match="not an sptlm example record"):
    records.decode(b"garbage", "shard x record 3")
  with pytest.raises(InputError, match="cut or damaged"):
    records.decode(records.encode(np.arange(4), np.ones(4))[:-2])
  ids, w = records.decode(records.encode(np.arange(4), np.array([0, 1, 1, 0])))
  assert ids.tolist() == [0, 1, 2, 3] and w.tolist() == [0, 1, 1, 0]
  broken = tmp_path / "broken"
  broken.mkdir()
  for name in ("manifest.json", "stats.json"):
    (broken / name).write_text((out / name).read_text())
  with pytest.raises(MissingFileError, match="re-run `sptlm data materialize`"):
    _batches(broken, 0)


def test_training_on_shards_logs_per_task_losses_and_resumes_exactly(shards, tmp_path):
  """The trainer on the mixture: steps 4-6 resumed from the step-3 checkpoint (data iterator
  state included) are the steps of the uninterrupted run."""
  _, out = shards
  common = ["train", "--config", str(ROOT / "configs" / "tiny.py"),
            f"--config.data.shards={out}", f"--config.vocab.speech_size={K}",
            "--config.model.num_layers=2", "--config.data.seq_len=64",
            "--config.data.global_batch_size=8", "--config.train.log_every=1",
            "--config.train.checkpoint_every=3", "--config.train.steps=6",
            "--config.train.async_checkpoints=False"]
  assert cli.main(common + ["--workdir", str(tmp_path / "a")]) == 0
  # the same run stopped after step 3: its step-3 checkpoint, its first 3 metric rows
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
  lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
  (tmp_path / "b" / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
  assert cli.main(common + ["--workdir", str(tmp_path / "b")]) == 0
  rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
          for d in ("a", "b")]
  assert [r["step"] for r in rows[1]] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(*rows):
    assert a["loss"] == b["loss"] and a["loss_task_interleaved"] == b["loss_task_interleaved"]
  assert {f"loss_task_{n}" for n in ("text", "interleaved", "speech", "asr", "tts")} <= set(
      rows[0][-1])


def test_damaged_records_and_ids_outside_the_vocabulary_are_skipped_and_counted(tmp_path):
  """A shard with a cut record and one with ids past the vocabulary: training input skips
  both (counted), and every batch holds only the good records' tokens."""
  from array_record.python.array_record_module import ArrayRecordWriter
  good = [records.encode(np.arange(5, 25), np.ones(20)) for _ in range(6)]
  bad = [records.encode(np.arange(5, 25), np.ones(20))[:-3],  # cut
         records.encode(np.array([5, 6, 99_999]), np.ones(3))]  # outside the vocabulary
  (tmp_path / "t").mkdir()
  w = ArrayRecordWriter(str(tmp_path / "t" / "t-00000-of-00001.array_record"), "group_size:1")
  for r in good[:3] + bad + good[3:]:
    w.write(r)
  w.close()
  (tmp_path / "manifest.json").write_text(json.dumps(
      {"config": {"vocab": {"text_size": 1024, "speech_size": K}}}))
  (tmp_path / "stats.json").write_text(json.dumps({"tasks": {"t": {
      "kind": "text", "rate": 1.0, "shards": 1, "examples": 8, "tokens": 123,
      "tokens per example": 15.4}}}))
  mixture_input.SKIPPED.clear()
  batches, _ = _batches(tmp_path, 20, num_shards=1, vocab_sizes=(1024, K))
  ids = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
  assert ids.max() < 1024 + K + 16 and set(ids.tolist()) <= set(range(5, 25))
  assert set(mixture_input.SKIPPED) == {"t: damaged records",
                                       "t: records with ids outside the vocabulary"}
  assert min(mixture_input.SKIPPED.values()) >= 1


def test_small_runs_read_a_data_config_straight_with_the_same_records(shards):
  """data.shards = a data config file: its tasks built in the training process give exactly
  the materialized records and statistics, and batches of the same shape."""
  from array_record.python.array_record_module import ArrayRecordReader
  config, out = shards
  stats, built, vocab = mixture_input.build_in_memory(str(config))
  on_disk = json.loads((out / "stats.json").read_text())["tasks"]
  assert vocab == (1024, K) and set(stats) == set(on_disk)
  for name, records_in_memory in built.items():
    for key in ("examples", "tokens", "speech tokens", "loss tokens", "skipped"):
      assert stats[name][key] == on_disk[name][key], (name, key)
    read = []
    for f in sorted((out / name).glob("*.array_record")):
      reader = ArrayRecordReader(str(f))
      read += reader.read_all()
      reader.close()
    assert sorted(records_in_memory) == sorted(read)
  batches, (_, summary) = _batches(pathlib.Path(str(config)), 2, vocab_sizes=(1024, K))
  assert batches[0]["inputs"].shape == (4, 64) and len(summary.task_names) == 5


def test_enormous_documents_are_cut_and_unknown_characters_counted(tmp_path):
  """A document past max_chars is cut there (counted); text a tokenizer cannot represent is
  counted (the shipped SentencePiece model falls back to bytes: nothing lost)."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  from data_pipelines import config as config_lib
  from data_pipelines.examples import ExampleBuilder
  path = data_config(tmp_path / "text_only.py", tmp_path / "no_t2t",
                     f'{{"t": dict(kind="text", files=("{tmp_path / "x.txt"}",), rate=1.0)}}')
  builder = ExampleBuilder(config_lib.load(path), max_chars=100)
  built = builder.build("text", ["word " * 200, "日本語 text"])
  stats = [builder.stats(b) for b in built]
  assert [s["documents cut to 100 characters"] for s in stats] == [1, 0]
  assert len(built[0].ids) < 60  # 100 characters' tokens + EOS, not 1,000 characters'
  assert stats[1]["unknown text tokens"] == 0  # byte fallback
  assert builder.tokenizer.decode(built[1].ids[:-1].tolist()) == "日本語 text"

  words = Tokenizer(models.WordLevel({"[UNK]": 0, "plain": 1, "text": 2, "</s>": 3},
                                     unk_token="[UNK]"))
  words.pre_tokenizer = pre_tokenizers.Whitespace()
  (tmp_path / "hf").mkdir()
  words.save(str(tmp_path / "hf" / "tokenizer.json"))
  cfg = config_lib.load(path, [f"--config.vocab.text_tokenizer={tmp_path / 'hf'}",
                               "--config.vocab.text_size=8"])
  hf = ExampleBuilder(cfg)
  b = hf.build("text", ["plain text 日本語 text"])[0]
  assert hf.stats(b)["unknown text tokens"] == 1


def test_gs_paths_really_work_against_a_gcs_emulator(tmp_path):
  """Documents and token records read from gs://, shards and statistics written to gs://
  (through etils and gcsfs), against a local GCS emulator; then the written stats read back."""
  emulator = pytest.importorskip("gcp_storage_emulator.server")
  import os
  import socket
  import subprocess
  import sys
  import urllib.parse
  import urllib.request
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="bkt")
  server.start()
  host = f"http://127.0.0.1:{port}"
  try:
    def put(name: str, data: bytes) -> None:
      url = (f"{host}/upload/storage/v1/b/bkt/o?uploadType=media&name="
             f"{urllib.parse.quote(name, safe='')}")
      urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST")).read()

    def get(name: str) -> bytes:
      return urllib.request.urlopen(
          f"{host}/storage/v1/b/bkt/o/{urllib.parse.quote(name, safe='')}?alt=media").read()

    put("in/docs.txt", "\n\n".join(_sentences(12, 5)).encode())
    put("in/speech.jsonl", "\n".join(json.dumps({"tokens": _codes(t).tolist()})
                                     for t in _sentences(10, 6)).encode())
    config = data_config(tmp_path / "gs.py", tmp_path / "no_t2t", """{
        "text": dict(kind="text", files=("gs://bkt/in/docs.txt",), rate=1.0, shards=2),
        "speech": dict(kind="speech", files=("gs://bkt/in/speech.jsonl",), rate=1.0,
                       shards=1)}""")
    env = dict(os.environ, STORAGE_EMULATOR_HOST=host, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "sptlm.cli", "data", "materialize", "--config",
                           str(config), "--output", "gs://bkt/out"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(get("out/stats.json"))["tasks"]
    assert stats["text"]["examples"] == 12 and stats["speech"]["examples"] == 10
    shard = get("out/text/text-00001-of-00002.array_record")
    assert len(shard) > 0
    assert json.loads(get("out/manifest.json"))["format"] == "sptlm-shards-1"
  finally:
    server.stop()


def test_grain_worker_processes_give_batches_that_resume_exactly(shards):
  """data.workers > 0: grain worker processes (mp_prefetch) build the batches; the state
  saved mid-way restores exactly there."""
  _, out = shards
  _, (it, _) = _batches(out, 3, workers=1)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  _, (again, _) = _batches(out, 0, workers=1)
  again.set_state(state)
  got = [next(again) for _ in range(3)]
  for a, b in zip(want, got):
    assert all((a[k] == b[k]).all() for k in a)
  for x in (it, again):
    x.close()
