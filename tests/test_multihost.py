"""Two local processes (jax.distributed over gloo, 4 CPU devices each) train like one with 8,
through a SIGTERM, a kill, a damaged checkpoint, and a resume on one process."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["train", "--config", str(ROOT / "configs" / "tiny.py"), "--config.model.num_layers=2",
        "--config.data.seq_len=64", "--config.data.global_batch_size=8",
        "--config.data.num_shards=2", "--config.train.log_every=1",
        "--config.train.warmup_steps=2", "--config.mesh.data=-1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args: list[str], devices: int, log: pathlib.Path) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-m", "sptlm.cli", *args], cwd=ROOT, env=env,
                          stdout=log.open("w"), stderr=subprocess.STDOUT)


def _job(args: list[str], workdir: pathlib.Path) -> list[subprocess.Popen]:
  port = _free_port()
  return [_start([*args, "--workdir", str(workdir), "--coordinator", f"127.0.0.1:{port}",
                  "--num-processes", "2", "--process-id", str(i)], 4,
                 workdir.parent / f"{workdir.name}.{i}.log") for i in range(2)]


def _wait(procs: list[subprocess.Popen], logs: list[pathlib.Path]) -> None:
  for p, log in zip(procs, logs):
    assert p.wait(timeout=600) == 0, log.read_text()[-3000:]


def _losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in rows]


def _wait_for(path: pathlib.Path, log: pathlib.Path, timeout: float = 400) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline and not path.exists():
    time.sleep(0.2)
  assert path.exists(), log.read_text()[-3000:]


def _saved(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_two_processes_match_one_through_sigterm_and_kill(tmp_path):
  total = 12
  steps = [f"--config.train.steps={total}", "--config.train.checkpoint_every=4"]
  single = tmp_path / "single"
  proc = _start([*ARGS, *steps, "--workdir", str(single)], 8, tmp_path / "single.log")
  _wait([proc], [tmp_path / "single.log"])
  want = _losses(single)
  assert len(want) == total

  multi = tmp_path / "multi"
  args = [*ARGS, *steps]
  logs = [tmp_path / f"multi.{i}.log" for i in range(2)]

  # 1. SIGTERM reaches only worker 1: both agree on a step, checkpoint it and exit cleanly.
  procs = _job(args, multi)
  # The start-up summary comes before the first step compiles (seconds), and the stop handler
  # is in place before it: the signal lands before the run can finish on any machine.
  deadline = time.time() + 400
  while time.time() < deadline and "tokens per step" not in logs[0].read_text():
    time.sleep(0.1)
  time.sleep(1.0)
  procs[1].send_signal(signal.SIGTERM)
  _wait(procs, logs)
  stopped = _saved(multi)
  assert stopped and stopped[-1] < total, stopped
  assert "received: saved a checkpoint" in logs[0].read_text()

  # 2. Restarted, it resumes; past the next periodic checkpoint worker 1 dies (a lost VM), and
  #    the job runner tears down the rest of the slice.
  procs = _job(args, multi)
  nxt = (stopped[-1] // 4 + 1) * 4
  _wait_for(multi / "checkpoints" / str(nxt) / "_CHECKPOINT_METADATA", logs[0])
  procs[1].send_signal(signal.SIGKILL)
  procs[1].wait()
  procs[0].send_signal(signal.SIGKILL)
  procs[0].wait()
  assert "resuming from checkpoint" in logs[0].read_text()

  # 3. The newest checkpoint is damaged (its biggest file truncated): process 0
  #    moves it aside and both workers resume from the one before it.
  saved = _saved(multi)
  newest = multi / "checkpoints" / str(saved[-1])
  victim = max((f for f in (newest / "state").rglob("*") if f.is_file()),
               key=lambda f: f.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:100])
  procs = _job(args, multi)
  _wait(procs, logs)
  assert (multi / "corrupt_checkpoints" / str(saved[-1])).is_dir()
  resumed = [[line for line in log.read_text().splitlines() if "resuming from checkpoint" in line]
             for log in logs]
  assert resumed[0] and resumed[0][-1] == resumed[1][-1], resumed
  assert resumed[0][-1].endswith(f"at step {saved[-2]}"), (resumed, saved)
  got = _losses(multi)
  assert [s for s, _ in got] == list(range(1, total + 1))
  for (_, a), (_, b) in zip(got, want):
    assert abs(a - b) <= 2e-6 * abs(b), (got, want)
  assert sorted(p.name for p in (multi / "checkpoints" / str(total) / "data").iterdir()
                if p.suffix == ".json") == ["process_0-of-2.json", "process_1-of-2.json"]
  # Its manifest was written after both workers' files: it lists worker 1's too.
  listed = json.loads((multi / "checkpoints" / str(total) / "sptlm_manifest.json").read_text())
  assert "data/process_1-of-2.json" in listed["files"]
  assert any(k.startswith("state/ocdbt.process_1/") for k in listed["files"]), sorted(listed)

  # 4. The same job resumed on one host with 8 devices: its two data streams come back from
  #    both workers' saved iterator states, and the losses are the uninterrupted run's.
  rehost = tmp_path / "rehost"
  shutil.copytree(multi, rehost)
  resume_at = _saved(rehost)[-2]
  for step in _saved(rehost):
    if step > resume_at:
      shutil.rmtree(rehost / "checkpoints" / str(step))
  rows = (rehost / "metrics.jsonl").read_text().splitlines()
  (rehost / "metrics.jsonl").write_text(
      "\n".join(r for r in rows if json.loads(r)["step"] <= resume_at) + "\n")
  proc = _start([*ARGS, *steps, "--workdir", str(rehost)], 8, tmp_path / "rehost.log")
  _wait([proc], [tmp_path / "rehost.log"])
  assert f"at step {resume_at}" in (tmp_path / "rehost.log").read_text()
  got = _losses(rehost)
  assert [s for s, _ in got] == list(range(1, total + 1))
  for (_, a), (_, b) in zip(got, want):
    assert abs(a - b) <= 2e-6 * abs(b), (got, want)
