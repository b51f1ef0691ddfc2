"""`launch/tpu_vm.sh`: sptlm on Cloud TPU VM slices (gcloud), one command per step.

  compile-check  sptlm compile for the accelerator type here; refuses unless it fits the HBM
  create         a TPU VM, or a queued resource (--queued, or --num-slices > 1: multislice)
  install        ships `git archive REF` (or --git-url) to every worker and pip-installs it
  run            starts the same `sptlm train` on every worker (--worker=all), detached
  logs           follows one worker's log (default: slice 0, worker 0)
  status         the slice's state and whether the job runs on every worker
  stop           SIGTERM on every worker: sptlm saves a checkpoint and exits
  delete         deletes the slice (queued resources with --force)
  babysit        loop: re-create a preempted slice, reinstall, restart; exit once the run is done

Every command takes the same flags, so one shell array serves them all; --dry-run prints each
command (`DRY-RUN: ...`) and runs none. See launch/README.md for a full pod run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from typing import List, Optional, Sequence, Union

import launchlib as lib
from launchlib import LaunchError

PROG = "tpu_vm.sh"
READY = {"READY", "ACTIVE"}
# A preempted TPU VM is PREEMPTED; a preempted queued resource goes SUSPENDING -> SUSPENDED.
GONE = {"PREEMPTED", "TERMINATED", "STOPPED", "SUSPENDED", "FAILED", "ABSENT"}
WORKER_SCRIPT = "sptlm-worker.sh"  # in each worker's home; ssh commands start there
ARCHIVE = "sptlm.tar.gz"


def log(message: str) -> None:
  lib.log(PROG, message)


def gcloud() -> str:
  return os.environ.get("SPTLM_GCLOUD", "gcloud")


# ---- The slice -------------------------------------------------------------------------------

class Slice:
  """A TPU VM, or a queued resource holding --num-slices nodes NAME-0..NAME-(N-1)."""

  def __init__(self, args: argparse.Namespace):
    self.name: str = args.name
    self.zone: str = args.zone
    self.project: Optional[str] = args.project
    self.num_slices: int = args.num_slices
    self.queued: bool = args.queued or args.num_slices > 1
    self.accelerator_type: Optional[str] = None
    self.runtime_version: Optional[str] = args.runtime_version
    if args.accelerator_type:
      self.accelerator_type, gen = lib.accelerator(args.accelerator_type)
      self.runtime_version = self.runtime_version or lib.RUNTIME_VERSION[gen]
    self.spot: bool = args.spot
    self.preemptible: bool = args.preemptible
    self.reserved: bool = args.reserved

  @property
  def nodes(self) -> List[str]:
    if self.num_slices == 1:
      return [self.name]
    return [f"{self.name}-{i}" for i in range(self.num_slices)]

  def where(self) -> List[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

  def create_command(self) -> List[str]:
    if not self.accelerator_type:
      raise LaunchError("create needs --accelerator-type, e.g. v5p-128")
    capacity = (["--spot"] if self.spot else []) + (["--reserved"] if self.reserved else [])
    if self.queued:
      if self.preemptible:
        raise LaunchError("queued resources take --spot, not --preemptible")
      nodes = ([f"--node-id={self.name}"] if self.num_slices == 1 else
               [f"--node-count={self.num_slices}", f"--node-prefix={self.name}"])
      return [gcloud(), "compute", "tpus", "queued-resources", "create", self.name,
              *self.where(), f"--accelerator-type={self.accelerator_type}",
              f"--runtime-version={self.runtime_version}", *nodes, *capacity]
    capacity += ["--preemptible"] if self.preemptible else []
    return [gcloud(), "compute", "tpus", "tpu-vm", "create", self.name, *self.where(),
            f"--accelerator-type={self.accelerator_type}", f"--version={self.runtime_version}",
            *capacity]

  def describe_command(self) -> List[str]:
    kind, field = ("queued-resources", "state.state") if self.queued else ("tpu-vm", "state")
    return [gcloud(), "compute", "tpus", kind, "describe", self.name, *self.where(),
            f"--format=value({field})"]

  def delete_command(self) -> List[str]:
    if self.queued:  # --force deletes the nodes with the request
      return [gcloud(), "compute", "tpus", "queued-resources", "delete", self.name,
              *self.where(), "--force", "--quiet"]
    return [gcloud(), "compute", "tpus", "tpu-vm", "delete", self.name, *self.where(), "--quiet"]

  def ssh_command(self, node: str, remote: Union[str, Sequence[str]],
                  worker: str = "all") -> List[str]:
    """`remote` is an argv, or a shell command line as it stands."""
    line = remote if isinstance(remote, str) else shlex.join(list(remote))
    return [gcloud(), "compute", "tpus", "tpu-vm", "ssh", node, *self.where(),
            f"--worker={worker}", f"--command={line}"]

  def scp_command(self, node: str, files: Sequence[str]) -> List[str]:
    return [gcloud(), "compute", "tpus", "tpu-vm", "scp", *files, f"{node}:", *self.where(),
            "--worker=all"]

  def on_every_worker(self, remote: Union[str, Sequence[str]]) -> List[List[str]]:
    return [self.ssh_command(node, remote) for node in self.nodes]


# ---- Steps -----------------------------------------------------------------------------------

def _need(args: argparse.Namespace, *names: str) -> None:
  missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
  if missing:
    raise LaunchError(f"{args.command} needs {', '.join(missing)}")


def _check_workdir(workdir: str) -> None:
  if not workdir.startswith("gs://"):
    raise LaunchError(f"--workdir {workdir} must be gs://BUCKET/...: every worker writes the "
                      "same checkpoints, and a preempted VM's disk is gone")


def step_compile_check(args: argparse.Namespace, overrides: Sequence[str],
                       runner: lib.Runner) -> None:
  _need(args, "config", "accelerator_type")
  lib.compile_check(PROG, runner, lib.repo_config_path(args.config), args.accelerator_type,
                    overrides, args.per_device_batch, args.hbm_fraction, args.num_slices)


def step_create(s: Slice, runner: lib.Runner, wait: bool, poll_seconds: float) -> None:
  runner.run(s.create_command(), "create")
  if s.queued and wait:  # a queued resource is a request: wait until its nodes exist
    while True:
      state = slice_state(s, runner)
      log(f"{s.name}: {state}")
      if state in READY:
        return
      if state in GONE:
        raise LaunchError(f"queued resource {s.name} is {state}; see `gcloud compute tpus "
                          f"queued-resources describe {s.name} --zone={s.zone}`")
      if runner.dry_run:
        return
      time.sleep(poll_seconds)


def step_install(args: argparse.Namespace, s: Slice, runner: lib.Runner) -> None:
  remote = ["bash", WORKER_SCRIPT, "install"]
  with lib.staging(runner, "tpu-vm") as stage:
    files = [str(stage / WORKER_SCRIPT)]
    if not runner.dry_run:
      shutil.copyfile(lib.REPO / "launch" / "worker.sh", files[0])
    if args.git_url:
      remote += ["--git-url", args.git_url] + (["--git-ref", args.ref] if args.ref else [])
    else:
      ref = args.ref or "HEAD"
      lib.warn_if_dirty(PROG, ref)
      archive = str(stage / ARCHIVE)
      runner.run(lib.git_archive_command(ref, archive), "git archive")
      files.insert(0, archive)
      remote += ["--archive", ARCHIVE]
    remote += ["--jax-version", lib.jax_version()]
    runner.run_all([s.scp_command(node, files) for node in s.nodes], "copy to the workers")
  runner.run_all(s.on_every_worker(remote), "install on the workers")


def step_run(args: argparse.Namespace, overrides: Sequence[str], s: Slice,
             runner: lib.Runner) -> None:
  remote = ["bash", WORKER_SCRIPT, "start"]
  for kv in args.env:
    if "=" not in kv:
      raise LaunchError(f"--env {kv} is not KEY=VALUE")
    remote += ["--env", kv]
  remote += ["--", *lib.train_command(lib.repo_config_path(args.config), args.workdir,
                                      overrides)]
  runner.run_all(s.on_every_worker(remote), "start sptlm train")


def step_stop(args: argparse.Namespace, s: Slice, runner: lib.Runner,
              fresh_ok: bool = False) -> None:
  """SIGTERM on every worker; with fresh_ok, workers never installed count as stopped."""
  remote = shlex.join(["bash", WORKER_SCRIPT, "stop", "--timeout", str(args.stop_timeout)])
  if fresh_ok:
    remote = f"[ ! -f {WORKER_SCRIPT} ] || {remote}"
  runner.run_all(s.on_every_worker(remote), "stop")


def slice_state(s: Slice, runner: lib.Runner) -> str:
  """READY/ACTIVE, PREEMPTED, SUSPENDED, CREATING, ... or ABSENT when there is no such slice."""
  command = s.describe_command()
  if runner.dry_run:
    runner.show(command)
    return runner.stub("STATE", "READY").upper()
  rc, out, err = runner.capture(command)
  if rc == 0:
    return out.strip().upper() or "UNKNOWN"
  if "NOT_FOUND" in err or "not found" in err.lower():
    return "ABSENT"
  raise LaunchError(f"could not read the state of {s.name}: "
                    f"{(err.strip().splitlines() or ['exit code %d' % rc])[-1]}")


def job_running(s: Slice, runner: lib.Runner) -> bool:
  """True when `sptlm train` runs on every worker of every slice."""
  commands = s.on_every_worker(["bash", WORKER_SCRIPT, "status"])
  if runner.dry_run:
    for command in commands:
      runner.show(command)
    return _yes(runner.stub("RUNNING", "yes"))
  return all(runner.capture(command)[0] == 0 for command in commands)


def _yes(answer: str) -> bool:
  return answer.strip().lower() in ("yes", "true", "1")


def _cat(workdir: str, name: str, tail_bytes: int = 0) -> List[str]:
  return [gcloud(), "storage", "cat", *([f"--range=-{tail_bytes}"] if tail_bytes else []),
          f"{workdir.rstrip('/')}/{name}"]


def run_finished(workdir: str, overrides: Sequence[str], runner: lib.Runner) -> bool:
  """The last metrics row has reached train.steps (--config.train.steps, else config.json's)."""
  target = lib.override_value(overrides, "train.steps")
  metrics = _cat(workdir, "metrics.jsonl", tail_bytes=65536)
  if runner.dry_run:
    runner.show(metrics if target else _cat(workdir, "config.json"))
    return _yes(runner.stub("FINISHED", "no"))
  if target is None:
    rc, out, _ = runner.capture(_cat(workdir, "config.json"))
    try:
      target = json.loads(out)["train"]["steps"] if rc == 0 else None
    except (ValueError, KeyError, TypeError):
      target = None
    if target is None:
      return False  # no run has started yet
  rc, out, _ = runner.capture(metrics)
  if rc != 0:
    return False
  for line in reversed(out.strip().splitlines()):
    try:
      return int(json.loads(line)["step"]) >= int(target)
    except (ValueError, KeyError, TypeError):
      continue  # the byte range may start mid-line
  return False


# ---- Commands --------------------------------------------------------------------------------

def cmd_compile_check(args: argparse.Namespace, overrides: Sequence[str],
                      runner: lib.Runner) -> int:
  step_compile_check(args, overrides, runner)
  return 0


def cmd_create(args: argparse.Namespace, overrides: Sequence[str], runner: lib.Runner) -> int:
  _need(args, "name", "zone", "accelerator_type")
  s = Slice(args)
  if not args.skip_compile_check:
    step_compile_check(args, overrides, runner)
  step_create(s, runner, wait=True, poll_seconds=args.poll_seconds)
  return 0


def cmd_install(args: argparse.Namespace, overrides: Sequence[str], runner: lib.Runner) -> int:
  _need(args, "name", "zone")
  step_install(args, Slice(args), runner)
  return 0


def cmd_run(args: argparse.Namespace, overrides: Sequence[str], runner: lib.Runner) -> int:
  _need(args, "name", "zone", "config", "workdir")
  _check_workdir(args.workdir)
  s = Slice(args)
  if not args.skip_compile_check:
    _need(args, "accelerator_type")
    step_compile_check(args, overrides, runner)
  step_run(args, overrides, s, runner)
  log(f"started on {len(s.nodes)} slice(s); `{PROG} logs` follows worker 0, "
      f"`{PROG} stop` checkpoints and stops")
  return 0


def cmd_logs(args: argparse.Namespace, overrides: Sequence[str], runner: lib.Runner) -> int:
  _need(args, "name", "zone")
  s = Slice(args)
  if not 0 <= args.slice < len(s.nodes):
    raise LaunchError(f"--slice {args.slice} is not in [0, {len(s.nodes)})")
  remote = ["bash", WORKER_SCRIPT, "logs", "--lines", str(args.lines)]
  remote += [] if args.no_follow else ["--follow"]
  runner.run(s.ssh_command(s.nodes[args.slice], remote, worker=str(args.worker)), "logs")
  return 0


def cmd_status(args: argparse.Namespace, overrides: Sequence[str], runner: lib.Runner) -> int:
  _need(args, "name", "zone")
  s = Slice(args)
  state = slice_state(s, runner)
  print(f"{s.name}: {state}")
  if state in READY:
    try:
      runner.run_all(s.on_every_worker(["bash", WORKER_SCRIPT, "status"]), "status")
    except LaunchError:
      print(f"{s.name}: the job is not running on every worker")
      return 3
  return 0


def cmd_stop(args: argparse.Namespace, overrides: Sequence[str], runner: lib.Runner) -> int:
  _need(args, "name", "zone")
  step_stop(args, Slice(args), runner)
  return 0


def cmd_delete(args: argparse.Namespace, overrides: Sequence[str], runner: lib.Runner) -> int:
  _need(args, "name", "zone")
  runner.run(Slice(args).delete_command(), "delete")
  return 0


def cmd_babysit(args: argparse.Namespace, overrides: Sequence[str], runner: lib.Runner) -> int:
  """Keeps the run going through preemptions until its metrics reach train.steps."""
  _need(args, "name", "zone", "accelerator_type", "config", "workdir")
  _check_workdir(args.workdir)
  s = Slice(args)
  if not args.skip_compile_check:
    step_compile_check(args, overrides, runner)
  max_iterations = args.max_iterations or (3 if runner.dry_run else 0)
  starts, installed = 0, False

  def start_job(reason: str) -> None:
    nonlocal starts, installed
    if starts > args.max_restarts:
      raise LaunchError(f"gave up after {args.max_restarts} restarts; see `{PROG} logs` "
                        "(raise --max-restarts to keep going)")
    log(f"{reason}: starting the job (start {starts + 1})")
    starts += 1
    step_stop(args, s, runner, fresh_ok=True)  # stragglers of a half-dead job hold the TPUs
    if not installed:
      step_install(args, s, runner)
      installed = True
    step_run(args, overrides, s, runner)

  iteration = 0
  while not max_iterations or iteration < max_iterations:
    iteration += 1
    try:
      state = slice_state(s, runner)
      log(f"[{iteration}] {s.name}: {state}")
      if state in READY:
        if job_running(s, runner):
          pass
        elif run_finished(args.workdir, overrides, runner):
          return _finished(args, s, runner)
        else:
          start_job("the job is not running on every worker")
      elif state in GONE:
        if run_finished(args.workdir, overrides, runner):
          return _finished(args, s, runner)
        if starts > args.max_restarts:
          raise LaunchError(f"gave up after {args.max_restarts} restarts")
        log(f"{s.name} is {state}: re-creating it; the job resumes from {args.workdir}")
        if state != "ABSENT":
          runner.run(s.delete_command(), "delete")
        step_create(s, runner, wait=False, poll_seconds=args.poll_seconds)
        installed = False
    except LaunchError as e:
      if "gave up" in str(e):
        raise
      log(f"[{iteration}] {e}; trying again in {args.poll_seconds:g}s")
    if args.poll_seconds:
      time.sleep(args.poll_seconds)
  log(f"stopped after {max_iterations} iterations (--max-iterations); the run is not finished")
  return 0


def _finished(args: argparse.Namespace, s: Slice, runner: lib.Runner) -> int:
  log(f"the run in {args.workdir} reached train.steps")
  if args.delete_when_done:
    runner.run(s.delete_command(), "delete")
  return 0


COMMANDS = {"compile-check": cmd_compile_check, "create": cmd_create, "install": cmd_install,
            "run": cmd_run, "logs": cmd_logs, "status": cmd_status, "stop": cmd_stop,
            "delete": cmd_delete, "babysit": cmd_babysit}


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  g = common.add_argument_group("slice")
  g.add_argument("--name", help="TPU VM or queued resource name (multislice nodes: NAME-0...)")
  g.add_argument("--zone", help="e.g. us-east5-a")
  g.add_argument("--project", help="GCP project (default: gcloud's)")
  g.add_argument("--accelerator-type", help="e.g. v5p-128, v5litepod-16 (or v5e-16), v6e-64")
  g.add_argument("--runtime-version",
                 help="TPU software version (default by generation: " + ", ".join(
                     f"{k} {v}" for k, v in lib.RUNTIME_VERSION.items()) + ")")
  g.add_argument("--num-slices", type=int, default=1,
                 help="slices joined over the data-center network (more than 1: a multislice "
                 "queued resource)")
  g.add_argument("--queued", action="store_true",
                 help="request a single slice as a queued resource too")
  cap = g.add_mutually_exclusive_group()
  cap.add_argument("--spot", action="store_true", help="Spot capacity: cheap, preemptible")
  cap.add_argument("--preemptible", action="store_true", help="preemptible TPU VM (not queued)")
  cap.add_argument("--reserved", action="store_true", help="the project's reservation")
  g = common.add_argument_group("job")
  g.add_argument("--config", help="get_config() file inside the checkout, e.g. configs/lm_1b.py")
  g.add_argument("--workdir", help="gs://BUCKET/runs/NAME: checkpoints and metrics")
  g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment of sptlm train on the workers (repeatable)")
  g.add_argument("--ref", help="git ref to ship (default HEAD; with --git-url: to check out)")
  g.add_argument("--git-url", help="workers clone this instead of receiving `git archive`")
  lib.add_compile_flags(common)
  g = common.add_argument_group("logs, stop, babysit")
  g.add_argument("--slice", type=int, default=0, help="logs: which slice (default 0)")
  g.add_argument("--worker", type=int, default=0, help="logs: which worker (default 0)")
  g.add_argument("--lines", type=int, default=100, help="logs: lines of history")
  g.add_argument("--no-follow", action="store_true", help="logs: print and return")
  g.add_argument("--stop-timeout", type=int, default=600,
                 help="stop: seconds to wait for the checkpoint before SIGKILL")
  g.add_argument("--poll-seconds", type=float, default=120.0,
                 help="babysit/create: seconds between state checks")
  g.add_argument("--max-iterations", type=int, default=0,
                 help="babysit: stop after this many checks (default: until done; 3 in a dry run)")
  g.add_argument("--max-restarts", type=int, default=50,
                 help="babysit: give up after this many re-creations and restarts")
  g.add_argument("--delete-when-done", action="store_true",
                 help="babysit: delete the slice once the run is done")
  common.add_argument("--dry-run", action="store_true",
                      help="print every command (DRY-RUN: ...) and run none")

  return lib.command_parser(PROG, __doc__, COMMANDS, common)


def main(argv: Optional[Sequence[str]] = None) -> int:
  return lib.run_command(PROG, build_parser(), COMMANDS, argv)


if __name__ == "__main__":
  sys.exit(main())
