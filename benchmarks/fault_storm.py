"""Fault storm: a tiny `sptlm train` killed at random moments, restarted each time, must end
with exactly the parameters and per-step losses of an uninterrupted run.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/fault_storm.py --kills 8 --kills-in-save 4 --sigterms 6 --seed 0

Faults, in an order drawn from --seed:
- "kill": SIGKILL a random 0-2 s after the process logged its first new step (sooner if it
  reaches its share of the steps: fault k of n by step steps * (k + 1) / (n + 1), so no run
  finishes while faults remain and every planned fault is injected);
- "kill_in_save": SIGKILL as soon as an asynchronous checkpoint write is seen in flight (its
  Orbax temporary directory exists);
- "term": SIGTERM at a random moment, capped the same way (the run saves a checkpoint and
  exits 0).
After the storm the same command runs to the end. Printed (and returned): faults injected,
how many landed inside a checkpoint write, runs, steps recomputed, and what differs from the
uninterrupted run: metrics rows, and bytes of the final train state (all must be 0).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["train", "--config", str(ROOT / "configs" / "tiny.py"), "--config.model.num_layers=2",
        "--config.data.seq_len=64", "--config.data.global_batch_size=8",
        "--config.train.log_every=1", "--config.train.warmup_steps=2", "--config.mesh.data=1",
        "--config.train.checkpoint_every=3", "--config.train.keep_checkpoints=2"]


@dataclasses.dataclass
class StormResult:
  seed: int
  steps: int
  faults: dict[str, int]
  kills_in_save: int  # SIGKILLs that landed while a checkpoint write was in flight
  runs: int  # processes started in the storm, the final one included
  steps_recomputed: int  # steps trained more than once (work lost to the faults)
  rows_differing: int  # metrics.jsonl rows not equal to the uninterrupted run's
  state_bytes_differing: int  # bytes of the final train state that differ
  state_bytes: int


def _env(cache: pathlib.Path) -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
              XLA_FLAGS="--xla_force_host_platform_device_count=1",
              JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _start(workdir: pathlib.Path, steps: int, env: dict[str, str],
           log: pathlib.Path) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "sptlm.cli", *ARGS,
                           f"--config.train.steps={steps}", "--workdir", str(workdir)],
                          cwd=ROOT, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)


def _rows(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:
      pass  # a torn line of a killed run: the next start drops it
  return out


def _last_step(workdir: pathlib.Path) -> int:
  rows = _rows(workdir)
  return rows[-1]["step"] if rows else 0


def _resume_step(workdir: pathlib.Path) -> int:
  """The step a start will resume from: the newest committed checkpoint."""
  d = workdir / "checkpoints"
  steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.exists() else []
  return max(steps, default=0)


def _saving(workdir: pathlib.Path) -> bool:
  d = workdir / "checkpoints"
  return d.exists() and any(".orbax-checkpoint-tmp" in p.name for p in d.iterdir())


def _final_state(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  import jax
  import orbax.checkpoint as ocp
  path = (workdir / "checkpoints" / str(step) / "state").resolve()  # Orbax wants it absolute
  restored = ocp.StandardCheckpointer().restore(path)
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}


def _bytes_differing(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[int, int]:
  total = sum(x.nbytes for x in b.values())
  if a.keys() != b.keys():
    return total, total
  diff = 0
  for k in a:
    x, y = np.ascontiguousarray(a[k]).view(np.uint8), np.ascontiguousarray(b[k]).view(np.uint8)
    diff += int((x != y).sum()) if x.shape == y.shape else y.size
  return diff, total


def run_storm(base: pathlib.Path, *, kills: int, kills_in_save: int, sigterms: int, seed: int,
              steps: int, timeout_s: float = 600) -> StormResult:
  """Runs the uninterrupted reference and the storm under `base`; see the module docstring."""
  rng = random.Random(seed)
  env = _env(base / "jax_cache")
  log = base / "storm.log"
  straight, storm = base / "straight", base / "storm"
  proc = _start(straight, steps, env, log)
  if proc.wait(timeout=timeout_s) != 0:
    raise RuntimeError(f"the uninterrupted run failed: {log.read_text()[-3000:]}")

  plan = ["kill"] * kills + ["kill_in_save"] * kills_in_save + ["term"] * sigterms
  rng.shuffle(plan)
  faults = {"kill": 0, "kill_in_save": 0, "term": 0}
  landed_in_save, runs, trained = 0, 0, 0
  for k, fault in enumerate(plan):
    # fault k fires by this step at the latest, so no run reaches the end while faults remain
    cap = steps * (k + 1) // (len(plan) + 1)
    before = _last_step(storm)
    if before >= steps:
      break
    start = _resume_step(storm)
    proc = _start(storm, steps, env, log)
    runs += 1
    deadline = time.time() + timeout_s
    # Wait for this process to train its first new step (start-up, restore and compilation).
    while proc.poll() is None and _last_step(storm) <= before and time.time() < deadline:
      time.sleep(0.02)
    if fault == "kill_in_save":
      while proc.poll() is None and not _saving(storm) and time.time() < deadline:
        time.sleep(0.002)
    else:
      end = time.time() + rng.uniform(0.0, 2.0)
      while proc.poll() is None and time.time() < end and _last_step(storm) < cap:
        time.sleep(0.01)
    if proc.poll() is None:
      in_save = _saving(storm)
      proc.send_signal(signal.SIGTERM if fault == "term" else signal.SIGKILL)
      faults[fault] += 1
      landed_in_save += int(in_save and fault != "term")
    code = proc.wait(timeout=timeout_s)
    if fault == "term" and code != 0 and _last_step(storm) < steps:
      raise RuntimeError(f"a SIGTERM'd run exited {code}: {log.read_text()[-3000:]}")
    trained += max(_last_step(storm) - start, 0)
  start = _resume_step(storm)
  proc = _start(storm, steps, env, log)  # the same command, to the end
  runs += 1
  if proc.wait(timeout=timeout_s) != 0:
    raise RuntimeError(f"the final run failed: {log.read_text()[-3000:]}")
  trained += steps - start

  want, got = _rows(straight), _rows(storm)
  keys = ("step", "loss", "grad_norm", "lr")
  differing = sum(1 for a, b in zip(got, want) if any(a.get(k) != b.get(k) for k in keys))
  differing += abs(len(got) - len(want))
  state_diff, state_bytes = _bytes_differing(_final_state(storm, steps),
                                             _final_state(straight, steps))
  return StormResult(seed=seed, steps=steps, faults=faults, kills_in_save=landed_in_save,
                     runs=runs, steps_recomputed=trained - steps, rows_differing=differing,
                     state_bytes_differing=state_diff, state_bytes=state_bytes)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kills", type=int, default=8, help="SIGKILLs at random moments")
  p.add_argument("--kills-in-save", type=int, default=4,
                 help="SIGKILLs while an async checkpoint write is in flight")
  p.add_argument("--sigterms", type=int, default=6)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--dir", default="runs/fault_storm")
  a = p.parse_args()
  base = pathlib.Path(a.dir) / f"seed{a.seed}"
  if base.exists():
    import shutil
    shutil.rmtree(base)
  base.mkdir(parents=True)
  t = time.time()
  r = run_storm(base, kills=a.kills, kills_in_save=a.kills_in_save, sigterms=a.sigterms,
                seed=a.seed, steps=a.steps)
  print(json.dumps(dataclasses.asdict(r) | {"seconds": round(time.time() - t)}))


if __name__ == "__main__":
  main()
