"""`launch/xpk.sh`: the same sptlm job as an xpk workload on a GKE cluster with TPU node pools.

  compile-check  sptlm compile for --tpu-type here; refuses unless it fits the HBM
  build-image    docker build of launch/Dockerfile from `git archive REF`, then docker push
  create         xpk workload create: sptlm train on every host of --num-slices slices
  list           xpk workload list: the workload's status
  logs           kubectl logs --follow of slice 0, worker 0
  delete         xpk workload delete

Preemption: JobSet restarts the whole workload (up to --max-restarts times) when a pod fails,
and the same `sptlm train` command resumes from the gs:// checkpoint in --workdir. Every
command takes the same flags; --dry-run prints each command (`DRY-RUN: ...`) and runs none,
--xpk-dry-run passes xpk its own --dry-run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional, Sequence

import launchlib as lib
from launchlib import LaunchError

PROG = "xpk.sh"
CONTAINER = "jax-tpu"  # xpk's --docker-name default: the main container of each pod
BASE_IMAGE = "python:3.11"  # sptlm needs Python 3.11; xpk's default base image is older


def log(message: str) -> None:
  lib.log(PROG, message)


def xpk() -> str:
  return os.environ.get("XPK", "xpk")


def _need(args: argparse.Namespace, *names: str) -> None:
  missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
  if missing:
    raise LaunchError(f"{args.command} needs {', '.join(missing)}")


def _where(args: argparse.Namespace) -> List[str]:
  out = ["--project", args.project] if args.project else []
  out += ["--zone", args.zone] if args.zone else []
  return out + (["--dry-run"] if args.xpk_dry_run else [])


def container_command(args: argparse.Namespace, overrides: Sequence[str]) -> str:
  """What each pod runs: sptlm train (after installing the shipped checkout on a base image)."""
  train = shlex.join(lib.train_command(lib.repo_config_path(args.config), args.workdir,
                                       overrides))
  if args.docker_image:
    return train
  install = shlex.join(["pip", "install", "-q", "-e", ".", f"jax[tpu]=={lib.jax_version()}"])
  return f"{install} && {train}"


def create_command(args: argparse.Namespace, overrides: Sequence[str],
                   script_dir: Optional[str]) -> List[str]:
  tpu_type, _ = lib.accelerator(args.tpu_type)
  argv = [xpk(), "workload", "create", "--cluster", args.cluster, "--workload", args.workload,
          "--tpu-type", tpu_type, "--num-slices", str(args.num_slices),
          "--command", container_command(args, overrides),
          "--max-restarts", str(args.max_restarts)]
  if args.docker_image:
    argv += ["--docker-image", args.docker_image]
  else:
    argv += ["--base-docker-image", args.base_docker_image, "--script-dir", str(script_dir)]
  argv += ["--spot"] if args.spot else []
  argv += ["--priority", args.priority] if args.priority else []
  for kv in args.env:
    if "=" not in kv:
      raise LaunchError(f"--env {kv} is not KEY=VALUE")
    argv += ["--env", kv]
  return argv + _where(args)


# ---- Commands --------------------------------------------------------------------------------

def cmd_compile_check(args: argparse.Namespace, overrides: Sequence[str],
                      runner: lib.Runner) -> int:
  _need(args, "config", "tpu_type")
  lib.compile_check(PROG, runner, lib.repo_config_path(args.config), args.tpu_type, overrides,
                    args.per_device_batch, args.hbm_fraction, args.num_slices)
  return 0


def cmd_build_image(args: argparse.Namespace, overrides: Sequence[str],
                    runner: lib.Runner) -> int:
  _need(args, "docker_image")
  ref = args.ref or "HEAD"
  lib.warn_if_dirty(PROG, ref)
  with lib.staging(runner, "image") as stage:
    archive, src = str(stage / "src.tar"), str(stage / "src")
    runner.run(lib.git_archive_command(ref, archive, fmt="tar"), "git archive")
    runner.run(["mkdir", "-p", src], "mkdir")
    runner.run(["tar", "-xf", archive, "-C", src], "tar")
    runner.run(["docker", "build", "-f", str(lib.REPO / "launch" / "Dockerfile"),
                "--build-arg", f"JAX_VERSION={lib.jax_version()}", "-t", args.docker_image,
                src], "docker build")
  if not args.no_push:
    runner.run(["docker", "push", args.docker_image], "docker push")
  return 0


def cmd_create(args: argparse.Namespace, overrides: Sequence[str], runner: lib.Runner) -> int:
  _need(args, "cluster", "workload", "tpu_type", "config", "workdir")
  if not args.workdir.startswith("gs://"):
    raise LaunchError(f"--workdir {args.workdir} must be gs://BUCKET/...: pods are replaced on "
                      "a restart and only a bucket keeps the checkpoints")
  if not args.skip_compile_check:
    cmd_compile_check(args, overrides, runner)
  if args.docker_image:
    runner.run(create_command(args, overrides, None), "xpk workload create")
    return 0
  ref = args.ref or "HEAD"
  lib.warn_if_dirty(PROG, ref)
  with lib.staging(runner, "xpk") as stage:  # xpk copies --script-dir into the base image
    archive, src = str(stage / "src.tar"), str(stage / "src")
    runner.run(lib.git_archive_command(ref, archive, fmt="tar"), "git archive")
    runner.run(["mkdir", "-p", src], "mkdir")
    runner.run(["tar", "-xf", archive, "-C", src], "tar")
    runner.run(create_command(args, overrides, src), "xpk workload create")
  return 0


def cmd_list(args: argparse.Namespace, overrides: Sequence[str], runner: lib.Runner) -> int:
  _need(args, "cluster")
  job = ["--filter-by-job", args.workload] if args.workload else []
  runner.run([xpk(), "workload", "list", "--cluster", args.cluster, *job, *_where(args)],
             "xpk workload list")
  return 0


def cmd_logs(args: argparse.Namespace, overrides: Sequence[str], runner: lib.Runner) -> int:
  _need(args, "cluster", "workload", "zone")
  location = args.cluster_location or args.zone.rsplit("-", 1)[0]
  project = [f"--project={args.project}"] if args.project else []
  runner.run(["gcloud", "container", "clusters", "get-credentials", args.cluster,
              f"--location={location}", *project], "get-credentials")
  selector = (f"jobset.sigs.k8s.io/jobset-name={args.workload},"
              f"jobset.sigs.k8s.io/job-index={args.slice},"
              f"batch.kubernetes.io/job-completion-index={args.worker}")
  runner.run(["kubectl", "logs", "--follow", f"--container={CONTAINER}",
              f"--selector={selector}", f"--tail={args.lines}"], "kubectl logs")
  return 0


def cmd_delete(args: argparse.Namespace, overrides: Sequence[str], runner: lib.Runner) -> int:
  _need(args, "cluster", "workload")
  runner.run([xpk(), "workload", "delete", "--cluster", args.cluster, "--workload",
              args.workload, *_where(args)], "xpk workload delete")
  return 0


COMMANDS = {"compile-check": cmd_compile_check, "build-image": cmd_build_image,
            "create": cmd_create, "list": cmd_list, "logs": cmd_logs, "delete": cmd_delete}


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  g = common.add_argument_group("cluster and workload")
  g.add_argument("--cluster", help="the xpk (GKE) cluster")
  g.add_argument("--workload", help="workload name (lowercase letters, digits, -)")
  g.add_argument("--project", help="GCP project (default: gcloud's)")
  g.add_argument("--zone", help="the cluster's zone, e.g. us-east5-a")
  g.add_argument("--cluster-location", help="logs: the cluster's region or zone (default: "
                 "the zone's region)")
  g.add_argument("--tpu-type", "--accelerator-type", dest="tpu_type",
                 help="e.g. v5p-128, v5litepod-16 (or v5e-16), v6e-64")
  g.add_argument("--num-slices", type=int, default=1, help="slices (multislice over DCN)")
  g.add_argument("--max-restarts", type=int, default=50,
                 help="JobSet restarts after a failure such as a preemption (default 50)")
  g.add_argument("--spot", action="store_true", help="Spot capacity")
  g.add_argument("--priority", choices=["very-low", "low", "medium", "high", "very-high"])
  g = common.add_argument_group("job")
  g.add_argument("--config", help="get_config() file inside the checkout, e.g. configs/lm_1b.py")
  g.add_argument("--workdir", help="gs://BUCKET/runs/NAME: checkpoints and metrics")
  g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment of sptlm train in the pods (repeatable)")
  g.add_argument("--docker-image", help="an image with sptlm installed in /app (build-image "
                 "makes one); without it each pod pip-installs the shipped checkout")
  g.add_argument("--base-docker-image", default=BASE_IMAGE,
                 help=f"base image when there is no --docker-image (default {BASE_IMAGE})")
  g.add_argument("--ref", help="git ref to ship (default HEAD)")
  g.add_argument("--no-push", action="store_true", help="build-image: do not docker push")
  lib.add_compile_flags(common)
  g = common.add_argument_group("logs")
  g.add_argument("--slice", type=int, default=0, help="which slice (default 0)")
  g.add_argument("--worker", type=int, default=0, help="which host of the slice (default 0)")
  g.add_argument("--lines", type=int, default=100, help="lines of history")
  common.add_argument("--xpk-dry-run", action="store_true",
                      help="pass --dry-run to xpk: it prints what it would do")
  common.add_argument("--dry-run", action="store_true",
                      help="print every command (DRY-RUN: ...) and run none")

  return lib.command_parser(PROG, __doc__, COMMANDS, common)


def main(argv: Optional[Sequence[str]] = None) -> int:
  return lib.run_command(PROG, build_parser(), COMMANDS, argv)


if __name__ == "__main__":
  sys.exit(main())
