"""sptlm.train.loop.run with a counting program: which steps log, evaluate, checkpoint and stop."""

import dataclasses
import itertools
import json
import math
import pathlib
from typing import Any

import numpy as np
import pytest

from sptlm.train import loop


class _Program:
  """state["n"] counts steps; step n's loss is losses.get(n, 1.0)."""

  abstract_state = None

  def __init__(self, losses: dict[int, float] | None = None):
    self.losses = losses or {}

  def init(self) -> dict[str, int]:
    return {"n": 0}

  def global_batch(self, local: Any) -> Any:
    return local

  def step(self, state: dict[str, int], batch: Any) -> tuple[dict[str, int], dict[str, Any]]:
    n = state["n"] + 1
    return {"n": n}, {"loss": np.float32(self.losses.get(n, 1.0)), "tokens": np.float32(10)}


class _Checkpointer:
  def __init__(self):
    self.saved: list[tuple[int, int]] = []  # (step, state["n"])
    self.closed = False

  def save(self, step: int, state: dict[str, int], data_iter: Any, config_json: str) -> None:
    assert config_json == "{}"
    self.saved.append((step, state["n"]))

  def wait(self) -> None:
    pass

  def close(self) -> None:
    self.closed = True


class _Stop:
  """Agrees to stop at the `at`-th call of agreed() (never when None)."""

  def __init__(self, at: int | None = None):
    self.at, self.calls, self.restored = at, 0, False
    self.received = "SIGTERM" if at is not None else None

  def agreed(self) -> bool:
    self.calls += 1
    return self.calls == self.at

  def restore(self) -> None:
    self.restored = True


def _run(tiny_config, workdir: pathlib.Path, *, start_step: int = 0, steps: int = 10,
         program: _Program | None = None, stop: _Stop | None = None,
         periodic: list[loop.Periodic] | None = None) -> tuple[dict[str, Any], _Checkpointer]:
  tcfg = dataclasses.replace(tiny_config.train, steps=steps, log_every=3, checkpoint_every=4)
  ckpt = _Checkpointer()
  last = loop.run(
      tcfg, str(workdir), "{}", program=program or _Program(), state={"n": start_step},
      start_step=start_step, data_iter=itertools.count(), ckpt=ckpt, stop=stop or _Stop(),
      counts=lambda m: {"tokens_per_s": float(m["tokens"])},
      report=lambda m, rates: ({"loss": m["loss"], "tokens_per_s": rates["tokens_per_s"]}, {}),
      periodic=periodic or [])
  return last, ckpt


def _rows(workdir: pathlib.Path) -> list[dict[str, Any]]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_logs_evaluates_and_checkpoints_at_their_steps(tiny_config, tmp_path):
  seen = []

  def evaluate(step: int, state: dict[str, int]) -> dict[str, float]:
    seen.append((step, state["n"]))
    return {"wer_test": 0.5}

  last, ckpt = _run(tiny_config, tmp_path, periodic=[loop.Periodic(5, evaluate)])
  assert ckpt.saved == [(4, 4), (8, 8), (10, 10)] and ckpt.closed
  assert seen == [(5, 5), (10, 10)]
  rows = _rows(tmp_path)
  assert [r["step"] for r in rows if "loss" in r] == [3, 6, 9, 10]
  assert [r["step"] for r in rows if "wer_test" in r] == [5, 10]
  assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
  assert last["step"] == 10 and last["wer_test"] == 0.5


def test_resume_continues_from_start_step(tiny_config, tmp_path):
  _, ckpt = _run(tiny_config, tmp_path, start_step=6)
  assert ckpt.saved == [(8, 8), (10, 10)]
  assert [r["step"] for r in _rows(tmp_path)] == [9, 10]


def test_non_finite_loss_names_the_step_and_the_last_good_checkpoint(tiny_config, tmp_path):
  stop = _Stop()
  with pytest.raises(loop.TrainingError, match=r"loss is nan at step 6; .*\(step 4\)"):
    _run(tiny_config, tmp_path, program=_Program({6: math.nan}), stop=stop)
  assert stop.restored


def test_agreed_stop_checkpoints_and_ends(tiny_config, tmp_path, capsys):
  last, ckpt = _run(tiny_config, tmp_path, stop=_Stop(at=2))
  assert ckpt.saved == [(2, 2)]
  assert last == {}  # nothing logged before step 3
  assert ("SIGTERM received: saved a checkpoint at step 2; rerun the same command to resume"
          in capsys.readouterr().out)


class _Source:
  """A checkpoint directory holding `steps`; its state is {"params": "p<step>", ...}."""

  steps: dict[str, int | None] = {}

  def __init__(self, workdir: str, *, keep: int, async_save: bool, read_only: bool = False):
    assert read_only  # another run's directory is never written to
    self.step = self.steps[workdir]

  def latest_step(self) -> int | None:
    return self.step

  def restore_state(self, step: int, abstract_state: Any) -> dict[str, str]:
    return {k: f"{k}{step}" for k in ("params", "vq", "opt_state")}

  def close(self) -> None:
    pass


class _Empty:
  def restore(self, abstract_state: Any, data_iter: Any, config: Any = None) -> None:
    return None


class _Fresh(_Program):
  def init(self) -> dict[str, str]:
    return {"params": "fresh", "vq": "fresh", "opt_state": "fresh"}


def test_init_from_copies_only_the_named_keys(monkeypatch):
  monkeypatch.setattr(loop.checkpoint_lib, "Checkpointer", _Source)
  monkeypatch.setattr(_Source, "steps", {"/init": 7, "/nothing": None})
  step, state = loop.restore_or_init(_Empty(), _Fresh(), None, "/init", ("params", "vq"))
  assert step == 0 and state == {"params": "params7", "vq": "vq7", "opt_state": "fresh"}
  _, state = loop.restore_or_init(_Empty(), _Fresh(), None, "/init", ("params",))
  assert state == {"params": "params7", "vq": "fresh", "opt_state": "fresh"}
  _, state = loop.restore_or_init(_Empty(), _Fresh(), None, "", ("params",))
  assert state == {"params": "fresh", "vq": "fresh", "opt_state": "fresh"}
  with pytest.raises(loop.TrainingError, match="holds no checkpoint"):
    loop.restore_or_init(_Empty(), _Fresh(), None, "/nothing", ("params",))
