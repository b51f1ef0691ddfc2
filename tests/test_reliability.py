"""Runs that never lose work: each promise of the README's "Resuming" section, with the fault
injected for real (damaged files, a changed config, a flaky store, a full disk, kills).

The Checkpointer tests use a small state in-process; the end-to-end ones run `sptlm train`.
"""

import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import fault_storm
from sptlm.train import checkpoint as ckpt_lib
from sptlm.train import metrics as metrics_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
FAST = ["--config.model.num_layers=2", "--config.data.seq_len=64",
        "--config.data.global_batch_size=8", "--config.train.log_every=1",
        "--config.train.warmup_steps=2", "--config.mesh.data=1"]


# ---- The Checkpointer on a small state ---------------------------------------------------------
class _Iter:
  """A data iterator as grain's checkpoint handler takes it."""

  def __init__(self, position: int = 0):
    self.position = position

  def get_state(self) -> bytes:
    return json.dumps({"position": self.position}).encode()

  def set_state(self, state: bytes) -> None:
    self.position = json.loads(state)["position"]

  def start_prefetch(self) -> None:
    pass


def _state(step: int, width: int = 64) -> dict:
  return {"params": {"w": jnp.full((width, 8), float(step)), "b": jnp.arange(8.0) + step},
          "step": jnp.int32(step)}


def _abstract(width: int = 64) -> dict:
  return jax.eval_shape(lambda: _state(0, width))


CONFIG = {"model": {"d_model": 64}, "train": {"steps": 10}}


def _saved(tmp_path: pathlib.Path, steps=(1, 2, 3), **kw) -> ckpt_lib.Checkpointer:
  c = ckpt_lib.Checkpointer(str(tmp_path), keep=5, async_save=True, retry_delay_s=0.01, **kw)
  for s in steps:
    c.save(s, _state(s), _Iter(s), json.dumps(CONFIG))
  c.wait()
  return c


def _reopen(tmp_path: pathlib.Path) -> ckpt_lib.Checkpointer:
  return ckpt_lib.Checkpointer(str(tmp_path), keep=5, async_save=True, retry_delay_s=0.01)


def _biggest(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _tree_digest(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_checkpoint_has_a_manifest_of_its_files(tmp_path):
  _saved(tmp_path).close()
  for s in (1, 2, 3):
    files = json.loads((tmp_path / "checkpoints" / str(s) / ckpt_lib.MANIFEST).read_text())
    listed = set(files["files"])
    assert "state/_METADATA" in listed and any(k.startswith("data/") for k in listed)
    assert all(v["size"] > 0 and len(v["crc32"]) == 8 for v in files["files"].values())


@pytest.mark.parametrize("damage", ["missing", "truncated", "bit_flip", "manifest"])
def test_damaged_newest_is_moved_aside_and_the_one_before_restores(tmp_path, damage):
  _saved(tmp_path).close()
  step3 = tmp_path / "checkpoints" / "3"
  victim = _biggest(step3)
  if damage == "missing":
    victim.unlink()
  elif damage == "truncated":
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  elif damage == "bit_flip":  # Orbax itself reads this back without complaint
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
  else:
    (step3 / ckpt_lib.MANIFEST).write_text("{not json")
  c = _reopen(tmp_path)
  it = _Iter()
  step, state = c.restore(_abstract(), it)
  c.close()
  assert step == 2 and it.position == 2 and float(state["params"]["w"][0, 0]) == 2.0
  assert (tmp_path / "corrupt_checkpoints" / "3").is_dir() and not step3.exists()


def test_the_same_step_quarantined_twice_is_kept_twice(tmp_path):
  c = _saved(tmp_path)
  c.close()
  for round_ in range(2):
    _biggest(tmp_path / "checkpoints" / "3").unlink()
    c = _reopen(tmp_path)
    assert c.restore(_abstract(), _Iter())[0] == 2
    c.save(3, _state(3), _Iter(3), json.dumps(CONFIG))  # the run redoes step 3
    c.wait()
    c.close()
  kept = sorted(p.name for p in (tmp_path / "corrupt_checkpoints").iterdir())
  assert kept == ["3", "3.1"]
  for name in kept:  # whole, as they were found
    assert (tmp_path / "corrupt_checkpoints" / name / ckpt_lib.MANIFEST).is_file()


def test_a_checkpoint_of_another_shape_is_a_user_error_and_nothing_moves(tmp_path):
  _saved(tmp_path).close()
  before = _tree_digest(tmp_path)
  c = _reopen(tmp_path)
  changed = {"model": {"d_model": 128}, "train": {"steps": 20}}
  with pytest.raises(ckpt_lib.CheckpointMismatch) as e:
    c.restore(_abstract(width=128), _Iter(), changed)
  c.close()
  msg = str(e.value)
  assert "\n" not in msg
  assert "params/w is (128, 8) in the config but (64, 8) in the checkpoint" in msg
  assert "model.d_model: 64 -> 128" in msg and "train.steps" not in msg
  assert _tree_digest(tmp_path) == before
  assert not (tmp_path / "corrupt_checkpoints").exists()


def test_a_missing_array_is_named(tmp_path):
  _saved(tmp_path).close()
  c = _reopen(tmp_path)
  wanted = dict(_abstract(), extra=jax.ShapeDtypeStruct((3,), jnp.float32))
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="extra .3,. is in the config's model "
                     "but not in the checkpoint"):
    c.restore(wanted, _Iter(), None)
  c.close()


def test_transient_errors_are_retried_then_stop_without_moving_anything(tmp_path, monkeypatch):
  _saved(tmp_path).close()
  before = _tree_digest(tmp_path)
  c = _reopen(tmp_path)
  real, calls = c.manager.restore, []

  def flaky(*args, **kwargs):
    calls.append(1)
    if len(calls) <= 2:
      raise PermissionError(errno.EACCES, "Permission denied", "gs://bucket/run/checkpoints/3")
    return real(*args, **kwargs)

  monkeypatch.setattr(c.manager, "restore", flaky)
  step, _ = c.restore(_abstract(), _Iter())
  assert step == 3 and len(calls) == 3

  def down(*args, **kwargs):
    raise TimeoutError("DEADLINE_EXCEEDED: gs://bucket timed out")

  monkeypatch.setattr(c.manager, "restore", down)
  with pytest.raises(ckpt_lib.CheckpointUnreadable, match="failed 5 times with a transient"):
    c.restore(_abstract(), _Iter())
  c.close()
  assert _tree_digest(tmp_path) == before
  assert not (tmp_path / "corrupt_checkpoints").exists()


def test_a_failure_not_proven_to_be_damage_leaves_the_checkpoint_in_place(tmp_path, monkeypatch):
  _saved(tmp_path).close()
  c = _reopen(tmp_path)

  def broken(*args, **kwargs):
    raise ValueError("some reader bug")

  monkeypatch.setattr(c.manager, "restore", broken)
  with pytest.raises(ckpt_lib.CheckpointUnreadable, match="passed its integrity check"):
    c.restore(_abstract(), _Iter())
  c.close()
  assert (tmp_path / "checkpoints" / "3").is_dir()
  assert not (tmp_path / "corrupt_checkpoints").exists()


def test_checkpoints_without_a_manifest_still_restore(tmp_path):
  """Written by an older sptlm: trusted unless Orbax's own metadata is missing."""
  _saved(tmp_path).close()
  for s in (2, 3):
    (tmp_path / "checkpoints" / str(s) / ckpt_lib.MANIFEST).unlink()
  (tmp_path / "checkpoints" / "3" / "state" / "_METADATA").unlink()
  c = _reopen(tmp_path)
  assert c.restore(_abstract(), _Iter())[0] == 2
  c.close()
  assert (tmp_path / "corrupt_checkpoints" / "3").is_dir()


def test_transient_classification():
  assert ckpt_lib.is_transient(PermissionError(errno.EACCES, "denied"))
  assert ckpt_lib.is_transient(TimeoutError())
  assert ckpt_lib.is_transient(RuntimeError("UNAVAILABLE: connection reset"))
  assert not ckpt_lib.is_transient(FileNotFoundError(errno.ENOENT, "gone"))
  assert not ckpt_lib.is_transient(ValueError("Requested shape (1, 2) is not compatible"))
  assert ckpt_lib.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
  assert ckpt_lib.is_disk_full(ValueError('RESOURCE_EXHAUSTED: Failed writing: "x" '
                                          "[OS error 28: No space left on device]"))


# ---- metrics.jsonl -----------------------------------------------------------------------------
def test_metrics_keep_the_restored_history_and_drop_a_torn_line(tmp_path, caplog):
  rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 9)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 9, "lo')
  with caplog.at_level(logging.WARNING):
    w = metrics_lib.MetricsWriter(str(tmp_path), resume_step=6)
    w.write(7, {"loss": 0.5})
    w.close()
  got = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6, 7]
  assert got[5]["loss"] == 1.0 / 6 and got[6]["loss"] == 0.5
  assert "dropped 1 unreadable line" in caplog.text


def test_metrics_of_a_run_restarted_from_scratch_are_kept_aside(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
  for _ in range(2):
    metrics_lib.MetricsWriter(str(tmp_path), resume_step=0).close()
  assert (tmp_path / "metrics.before_step0.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
  assert (tmp_path / "metrics.jsonl").read_text() == ""


# ---- `sptlm train` end to end ------------------------------------------------------------------
def _env(tmp_path: pathlib.Path) -> dict[str, str]:
  return fault_storm._env(tmp_path.parent / "jax_cache")


def _train(args: list[str], env: dict[str, str], code: int = 0) -> tuple[str, str]:
  proc = subprocess.run([sys.executable, "-m", "sptlm.cli", "train", "--config", TINY, *FAST,
                         *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc.stdout, proc.stderr


def _rows(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_changed_config_stops_before_anything_is_touched(tmp_path):
  env, wd = _env(tmp_path), tmp_path / "run"
  base = ["--workdir", str(wd), "--config.train.steps=6", "--config.train.checkpoint_every=3"]
  _train(base, env)
  before = _tree_digest(wd)
  _, err = _train([*base, "--config.model.d_model=256"], env, code=1)
  line = err.strip().splitlines()[-1]
  assert line.startswith("sptlm train: error: checkpoint ") and "Traceback" not in err
  assert "params/" in line and "(2176, 256) in the config but (2176, 128) in the checkpoint" in line
  assert "model.d_model: 128 -> 256" in line
  assert _tree_digest(wd) == before  # checkpoints, config.json and metrics.jsonl as they were


def test_raising_steps_keeps_the_learning_rate_plan_and_the_old_config(tmp_path):
  env, wd = _env(tmp_path), tmp_path / "run"
  base = ["--workdir", str(wd), "--config.train.checkpoint_every=4",
          "--config.train.learning_rate=0.01", "--config.train.min_learning_rate=0.001"]
  _train([*base, "--config.train.steps=8"], env)
  planned = _rows(wd)
  out, _ = _train([*base, "--config.train.steps=8"], env)  # again: nothing to do
  assert "already complete" in out and "--config.train.steps=16" in out
  assert _rows(wd) == planned
  out, _ = _train([*base, "--config.train.steps=12"], env)
  assert "learning-rate plan kept at 8 steps" in out
  rows = _rows(wd)
  assert rows[:8] == planned
  assert [r["lr"] for r in rows[8:]] == pytest.approx([0.001] * 4)
  old = json.loads((wd / "config.step8.json").read_text())
  new = json.loads((wd / "config.json").read_text())
  assert old["train"]["steps"] == 8 and new["train"]["steps"] == 12
  assert new["train"]["schedule_steps"] == 8
  for r in rows:
    assert 0 < r["tokens_per_s"] <= r["padded_tokens_per_s"]


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  f = tmp_path / "run"
  f.write_text("not a directory")
  _, err = _train(["--workdir", str(f)], _env(tmp_path), code=1)
  assert err.strip() == f"sptlm train: error: --workdir {f} is a file, not a directory: " \
      "choose another path"


def _mount_tmpfs(path: pathlib.Path, size: str) -> bool:
  path.mkdir(parents=True, exist_ok=True)
  ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode == 0
  return ok


def test_a_full_disk_during_a_save_stops_with_one_line_and_loses_nothing(tmp_path):
  """A real full disk: the run directory on a 12 MB tmpfs holds one checkpoint (7.3 MB)."""
  if os.geteuid() != 0 or shutil.which("mount") is None:
    pytest.skip("needs root to mount a size-limited tmpfs")
  env, disk = _env(tmp_path), tmp_path / "disk"
  if not _mount_tmpfs(disk, "12m"):
    pytest.skip("this machine does not allow mounting a tmpfs")
  try:
    wd = disk / "run"
    args = ["--workdir", str(wd), "--config.train.steps=12", "--config.train.checkpoint_every=4",
            "--config.train.keep_checkpoints=2"]
    _, err = _train(args, env, code=1)
    last = err.strip().splitlines()[-1]
    assert last.startswith("sptlm train: error: no space left on device under "), err[-3000:]
    assert "checkpoint of step 8" in last and "(step 4) is intact" in last
    assert "Traceback" not in err
    rows = _rows(wd)
    assert [r["step"] for r in rows][:8] == list(range(1, 9))
    # More room, the same command: it resumes from step 4 and ends as an uninterrupted run.
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    out, err = _train(args, env)
    assert "resuming from checkpoint at step 4" in err
    straight = tmp_path / "straight"
    _train([*args[2:], "--workdir", str(straight)], env)
    assert _rows(wd) == [dict(r, elapsed_s=r2["elapsed_s"], tokens_per_s=r2["tokens_per_s"],
                              padded_tokens_per_s=r2["padded_tokens_per_s"], mfu=r2["mfu"])
                         for r, r2 in zip(_rows(straight), _rows(wd))]
  finally:
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _assert_storm(result: fault_storm.StormResult) -> None:
  assert sum(result.faults.values()) >= 1, result
  assert result.rows_differing == 0 and result.state_bytes_differing == 0, result


def test_fault_storm_short(tmp_path):
  r = fault_storm.run_storm(tmp_path, kills=1, kills_in_save=1, sigterms=1, seed=0, steps=40)
  _assert_storm(r)
  assert r.faults == {"kill": 1, "kill_in_save": 1, "term": 1}, r  # every planned fault landed


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_fault_storm(tmp_path, seed):
  r = fault_storm.run_storm(tmp_path, kills=8, kills_in_save=4, sigterms=6, seed=seed,
                            steps=300)
  _assert_storm(r)
  assert r.faults["kill"] + r.faults["kill_in_save"] >= 10, r
