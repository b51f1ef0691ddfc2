"""launch/: the commands the TPU VM and xpk launchers would run, read from their --dry-run.

The launchers run as the user runs them (bash launch/*.sh, in a subprocess) with neither gcloud
nor xpk needed: dry runs print `DRY-RUN: <argv>` lines, and the babysitter's questions (slice
state, job running, run finished) come from SPTLM_LAUNCH_STUB_* answers. One babysitter test
drives the real code path through a fake gcloud; the worker script runs here under a temporary
HOME; xpk's own argument parser checks our xpk command lines where xpk is installed.
"""

import contextlib
import io
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
PYPROJECT_JAX = re.search(r'"jax==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)

SLICE = ["--name", "sp", "--zone", "us-east5-a", "--project", "proj"]
JOB = ["--config", "configs/tiny.py", "--workdir", "gs://bkt/runs/tiny"]


sys.path.insert(0, str(LAUNCH))
import tpu_vm  # noqa: E402
import xpk_workload  # noqa: E402

MAINS = {"tpu_vm.sh": tpu_vm.main, "xpk.sh": xpk_workload.main}


def launch(script: str, *args: str, env: dict | None = None,
           expect_rc: int = 0) -> subprocess.CompletedProcess:
  """Runs a launcher's main in this process (fast); test_entry_scripts runs the .sh files."""
  saved = dict(os.environ)
  for k in [k for k in os.environ if k.startswith("SPTLM_LAUNCH_STUB_")
            or k in ("XPK", "SPTLM_GCLOUD", "SPTLM_BIN")]:
    del os.environ[k]  # commands name plain `gcloud` and `xpk`
  os.environ.update(env or {})
  out, err = io.StringIO(), io.StringIO()
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        rc = MAINS[script](list(args))
      except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
  finally:
    os.environ.clear()
    os.environ.update(saved)
  p = subprocess.CompletedProcess([script, *args], rc, out.getvalue(), err.getvalue())
  assert p.returncode == expect_rc, f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
  return p


def commands(p: subprocess.CompletedProcess) -> list[list[str]]:
  """The argv of every DRY-RUN line; every other stdout line is not a command."""
  return [shlex.split(line[len("DRY-RUN: "):]) for line in p.stdout.splitlines()
          if line.startswith("DRY-RUN: ")]


def flag(argv: list[str], name: str) -> str:
  """The value of --name=VALUE or --name VALUE in argv."""
  for i, a in enumerate(argv):
    if a.startswith(f"{name}="):
      return a.split("=", 1)[1]
    if a == name:
      return argv[i + 1]
  raise AssertionError(f"{name} not in {argv}")


def remote(argv: list[str]) -> list[str]:
  """The command a `gcloud ... ssh --command=...` runs on the workers, as argv."""
  return shlex.split(flag(argv, "--command"))


def kind(argv: list[str]) -> str:
  """A short name for a command, for checking sequences."""
  if argv[0] == "gcloud" and argv[1:3] == ["compute", "tpus"]:
    if argv[4] == "ssh":
      words = remote(argv)
      return "ssh " + words[len(words) - words[::-1].index("sptlm-worker.sh")]  # its subcommand
    return f"{argv[3]} {argv[4]}"
  if argv[0] == "gcloud" and argv[1] == "storage":
    return "storage cat"
  if argv[0] == "git":
    return "git archive"
  if argv[0].endswith("sptlm"):
    return "sptlm " + argv[1]
  return argv[0]


# ---- tpu_vm.sh: single commands ---------------------------------------------------------------

def test_create_tpu_vm_runs_compile_check_then_gcloud_create():
  p = launch("tpu_vm.sh", "create", *SLICE, "--accelerator-type", "v5p-128", "--spot", *JOB,
             "--config.mesh.fsdp=-1", "--dry-run")
  check, create = commands(p)
  assert check[1:] == ["compile", "--config", str(ROOT / "configs/tiny.py"), "--topology",
                       "v5p-128", "--config.mesh.fsdp=-1"]
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sp", "--zone=us-east5-a",
                    "--project=proj", "--accelerator-type=v5p-128",
                    "--version=v2-alpha-tpuv5", "--spot"]


@pytest.mark.parametrize("accel, gcloud_type, runtime", [
    ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5litepod-256", "v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v6e-64", "v6e-64", "v2-alpha-tpuv6e"),
    ("v4-32", "v4-32", "tpu-ubuntu2204-base"),
])
def test_create_names_accelerator_and_runtime_as_gcloud_does(accel, gcloud_type, runtime):
  p = launch("tpu_vm.sh", "create", *SLICE, "--accelerator-type", accel, "--preemptible",
             "--skip-compile-check", "--dry-run")
  (create,) = commands(p)
  assert flag(create, "--accelerator-type") == gcloud_type
  assert flag(create, "--version") == runtime
  assert "--preemptible" in create and "--spot" not in create


def test_create_takes_an_explicit_runtime_version():
  p = launch("tpu_vm.sh", "create", *SLICE, "--accelerator-type", "v5p-8",
             "--runtime-version", "v2-alpha-tpuv5-custom", "--skip-compile-check", "--dry-run")
  assert flag(commands(p)[0], "--version") == "v2-alpha-tpuv5-custom"


def test_multislice_is_a_queued_resource_with_one_node_per_slice():
  p = launch("tpu_vm.sh", "create", *SLICE, "--accelerator-type", "v5p-256", "--spot",
             "--num-slices", "4", *JOB, "--dry-run")
  check, create, describe = commands(p)
  assert kind(check) == "sptlm compile"
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "sp"]
  assert flag(create, "--accelerator-type") == "v5p-256"
  assert flag(create, "--runtime-version") == "v2-alpha-tpuv5"
  assert (flag(create, "--node-count"), flag(create, "--node-prefix")) == ("4", "sp")
  assert "--spot" in create and not any(a.startswith("--node-id") for a in create)
  # a queued resource is a request: create waits until it is ACTIVE
  assert describe[3:6] == ["queued-resources", "describe", "sp"]
  assert flag(describe, "--format") == "value(state.state)"
  assert "one slice of 4" in p.stderr

  p = launch("tpu_vm.sh", "run", *SLICE, "--num-slices", "4", *JOB, "--skip-compile-check",
             "--dry-run")
  ssh = commands(p)
  assert [c[5] for c in ssh] == ["sp-0", "sp-1", "sp-2", "sp-3"]
  assert all(flag(c, "--worker") == "all" for c in ssh)


def test_single_slice_queued_resource_names_its_node():
  p = launch("tpu_vm.sh", "create", *SLICE, "--accelerator-type", "v5litepod-16", "--queued",
             "--skip-compile-check", "--dry-run")
  create = commands(p)[0]
  assert create[3:5] == ["queued-resources", "create"] and flag(create, "--node-id") == "sp"


def test_queued_resources_refuse_preemptible():
  p = launch("tpu_vm.sh", "create", *SLICE, "--accelerator-type", "v5p-8", "--queued",
             "--preemptible", "--skip-compile-check", "--dry-run", expect_rc=1)
  assert "--spot" in p.stderr


def test_run_starts_the_same_sptlm_train_on_every_worker():
  p = launch("tpu_vm.sh", "run", *SLICE, "--accelerator-type", "v5p-128", *JOB,
             "--env", "LIBTPU_INIT_ARGS=--xla_tpu_a=1 --xla_tpu_b=2",
             "--config.train.steps=500", "--config.model.remat", "dots", "--dry-run")
  check, ssh = commands(p)
  assert kind(check) == "sptlm compile"
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sp"]
  assert flag(ssh, "--worker") == "all" and flag(ssh, "--zone") == "us-east5-a"
  cmd = remote(ssh)
  assert cmd[:3] == ["bash", "sptlm-worker.sh", "start"]
  assert flag(cmd, "--env") == "LIBTPU_INIT_ARGS=--xla_tpu_a=1 --xla_tpu_b=2"
  train = cmd[cmd.index("--") + 1:]
  assert train == ["sptlm", "train", "--config", "configs/tiny.py", "--workdir",
                   "gs://bkt/runs/tiny", "--config.train.steps=500", "--config.model.remat=dots"]


def test_run_needs_a_bucket_workdir_and_a_config_in_the_checkout(tmp_path):
  p = launch("tpu_vm.sh", "run", *SLICE, "--config", "configs/tiny.py", "--workdir", "runs/x",
             "--skip-compile-check", "--dry-run", expect_rc=1)
  assert "gs://" in p.stderr
  outside = tmp_path / "mine.py"
  outside.write_text("def get_config(): ...\n")
  p = launch("tpu_vm.sh", "run", *SLICE, "--config", str(outside), "--workdir", "gs://b/r",
             "--skip-compile-check", "--dry-run", expect_rc=1)
  assert "outside the checkout" in p.stderr
  p = launch("tpu_vm.sh", "run", *SLICE, "--config", "configs/nope.py", "--workdir", "gs://b/r",
             "--skip-compile-check", "--dry-run", expect_rc=1)
  assert "no such file" in p.stderr


def test_install_ships_git_archive_and_pins_jax():
  p = launch("tpu_vm.sh", "install", *SLICE, "--num-slices", "2", "--dry-run")
  archive, scp0, scp1, ssh0, ssh1 = commands(p)
  assert archive[:4] == ["git", "-C", str(ROOT), "archive"] and archive[-1] == "HEAD"
  tarball = flag(archive, "-o")
  for node, scp, ssh in (("sp-0", scp0, ssh0), ("sp-1", scp1, ssh1)):
    assert scp[3:5] == ["tpu-vm", "scp"] and flag(scp, "--worker") == "all"
    assert scp[5] == tarball and scp[6].endswith("/sptlm-worker.sh") and scp[7] == f"{node}:"
    assert ssh[5] == node and flag(ssh, "--worker") == "all"
    assert remote(ssh) == ["bash", "sptlm-worker.sh", "install", "--archive", "sptlm.tar.gz",
                           "--jax-version", PYPROJECT_JAX]


def test_install_from_a_git_url():
  p = launch("tpu_vm.sh", "install", *SLICE, "--git-url", "https://github.com/me/sptlm",
             "--ref", "v1.2", "--dry-run")
  scp, ssh = commands(p)
  assert scp[5].endswith("/sptlm-worker.sh") and scp[6] == "sp:"  # only the worker script
  assert remote(ssh)[3:] == ["--git-url", "https://github.com/me/sptlm", "--git-ref", "v1.2",
                             "--jax-version", PYPROJECT_JAX]


def test_logs_stop_status_delete():
  (logs,) = commands(launch("tpu_vm.sh", "logs", *SLICE, "--worker", "3", "--dry-run"))
  assert flag(logs, "--worker") == "3" and remote(logs)[2:] == ["logs", "--lines", "100",
                                                                 "--follow"]
  (stop,) = commands(launch("tpu_vm.sh", "stop", *SLICE, "--dry-run"))
  assert flag(stop, "--worker") == "all" and remote(stop)[2] == "stop"
  p = launch("tpu_vm.sh", "status", *SLICE, "--dry-run",
             env={"SPTLM_LAUNCH_STUB_STATE": "PREEMPTED"})
  assert [kind(c) for c in commands(p)] == ["tpu-vm describe"] and "sp: PREEMPTED" in p.stdout
  (delete,) = commands(launch("tpu_vm.sh", "delete", *SLICE, "--dry-run"))
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "sp", "--zone=us-east5-a",
                    "--project=proj", "--quiet"]
  (delete,) = commands(launch("tpu_vm.sh", "delete", *SLICE, "--num-slices", "2", "--dry-run"))
  assert delete[3:6] == ["queued-resources", "delete", "sp"] and "--force" in delete


def test_entry_scripts_dry_run_without_gcloud_sptlm_git_or_python3_on_path(tmp_path):
  """bash launch/*.sh as users run them; a dry run needs nothing installed and writes nothing."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
  env = {"PATH": str(bin_dir), "PYTHON": sys.executable, "SPTLM_BIN": str(tmp_path / "none"),
         "TMPDIR": str(tmp_path)}
  runs = [("tpu_vm.sh", "babysit", *SLICE, "--accelerator-type", "v5p-8", *JOB,
           "--poll-seconds", "0"),
          ("xpk.sh", "create", *XPK_ARGS)]
  for script, *args in runs:
    p = subprocess.run(["/bin/bash", str(LAUNCH / script), *args, "--dry-run"], env=env,
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert any(c[:2] in (["gcloud", "compute"], ["xpk", "workload"]) for c in commands(p))
  assert [p.name for p in tmp_path.iterdir()] == ["bin"]
  p = subprocess.run(["/bin/bash", str(LAUNCH / "tpu_vm.sh"), "run", "--dry-run"], env=env,
                     capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert p.returncode == 1 and p.stderr.strip() == (
      "tpu_vm.sh run: error: run needs --name, --zone, --config, --workdir")


# ---- tpu_vm.sh babysit -----------------------------------------------------------------------

BABYSIT = ["babysit", *SLICE, "--accelerator-type", "v5p-128", "--spot", *JOB,
           "--poll-seconds", "0", "--dry-run"]


def test_babysit_recreates_a_preempted_slice_and_restarts_the_job(tmp_path):
  p = launch("tpu_vm.sh", *BABYSIT, "--max-iterations", "3", env={
      "SPTLM_LAUNCH_STUB_STATE": "READY,PREEMPTED,READY",
      "SPTLM_LAUNCH_STUB_RUNNING": "yes,no",
      "SPTLM_LAUNCH_STUB_FINISHED": "no"})
  cmds = commands(p)
  assert [kind(c) for c in cmds] == [
      "sptlm compile",
      "tpu-vm describe", "ssh status",  # 1: READY, training
      "tpu-vm describe", "storage cat", "tpu-vm delete", "tpu-vm create",  # 2: PREEMPTED
      "tpu-vm describe", "ssh status", "storage cat",  # 3: READY, the job is not running
      "ssh stop", "git archive", "tpu-vm scp", "ssh install", "ssh start"]
  create = cmds[6]
  assert create[5] == "sp" and flag(create, "--accelerator-type") == "v5p-128"
  assert "--spot" in create and flag(create, "--version") == "v2-alpha-tpuv5"
  train = remote(cmds[-1])
  assert train[train.index("--") + 1:] == ["sptlm", "train", "--config", "configs/tiny.py",
                                           "--workdir", "gs://bkt/runs/tiny"]
  assert "re-creating it" in p.stderr
  # the stop before a start succeeds on a fresh worker (no script yet) and on an idle one
  stop = flag(cmds[10], "--command")
  env = dict(os.environ, HOME=str(tmp_path), SPTLM_WORKER_HOME=str(tmp_path))
  assert subprocess.run(["bash", "-c", stop], cwd=tmp_path, env=env).returncode == 0
  shutil.copy(LAUNCH / "worker.sh", tmp_path / "sptlm-worker.sh")
  p = subprocess.run(["bash", "-c", stop], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert p.returncode == 0 and "not running" in p.stdout


def test_babysit_multislice_recreates_the_queued_resource():
  p = launch("tpu_vm.sh", *BABYSIT, "--num-slices", "2", "--skip-compile-check",
             "--max-iterations", "2",
             env={"SPTLM_LAUNCH_STUB_STATE": "SUSPENDED,ACTIVE", "SPTLM_LAUNCH_STUB_RUNNING": "no"})
  cmds = commands(p)
  assert [kind(c) for c in cmds] == [
      "queued-resources describe", "storage cat", "queued-resources delete",
      "queued-resources create",
      "queued-resources describe", "ssh status", "ssh status", "storage cat",
      "ssh stop", "ssh stop", "git archive", "tpu-vm scp", "tpu-vm scp", "ssh install",
      "ssh install", "ssh start", "ssh start"]
  assert "--force" in cmds[2] and flag(cmds[3], "--node-count") == "2"
  assert [c[5] for c in cmds if kind(c) == "ssh start"] == ["sp-0", "sp-1"]


def test_babysit_recreates_an_absent_slice_without_deleting():
  p = launch("tpu_vm.sh", *BABYSIT, "--skip-compile-check", "--max-iterations", "1",
             env={"SPTLM_LAUNCH_STUB_STATE": "ABSENT"})
  assert [kind(c) for c in commands(p)] == ["tpu-vm describe", "storage cat", "tpu-vm create"]


def test_babysit_waits_while_the_slice_is_being_made():
  p = launch("tpu_vm.sh", *BABYSIT, "--skip-compile-check", "--max-iterations", "2",
             env={"SPTLM_LAUNCH_STUB_STATE": "CREATING"})
  assert [kind(c) for c in commands(p)] == ["tpu-vm describe"] * 2


def test_babysit_exits_when_the_run_is_finished():
  p = launch("tpu_vm.sh", *BABYSIT, "--skip-compile-check", "--delete-when-done", env={
      "SPTLM_LAUNCH_STUB_STATE": "READY", "SPTLM_LAUNCH_STUB_RUNNING": "no",
      "SPTLM_LAUNCH_STUB_FINISHED": "yes"})
  assert [kind(c) for c in commands(p)] == ["tpu-vm describe", "ssh status", "storage cat",
                                            "tpu-vm delete"]
  assert "reached train.steps" in p.stderr


def test_babysit_gives_up_after_max_restarts():
  p = launch("tpu_vm.sh", *BABYSIT, "--skip-compile-check", "--max-iterations", "10",
             "--max-restarts", "1",
             env={"SPTLM_LAUNCH_STUB_STATE": "READY", "SPTLM_LAUNCH_STUB_RUNNING": "no"},
             expect_rc=1)
  assert [kind(c) for c in commands(p)].count("ssh start") == 2
  assert "gave up after 1 restarts" in p.stderr


FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    # A stand-in for gcloud: logs its argv, answers describe/ssh status/storage cat from files.
    import pathlib, shutil, sys
    here = pathlib.Path(__file__).parent
    args = sys.argv[1:]
    with open(here / "calls.log", "a") as f:
        f.write(repr(args) + "\\n")
    def pop(name):
        lines = (here / name).read_text().splitlines()
        (here / name).write_text("\\n".join(lines[1:] or lines[-1:]))
        return lines[0]
    if "describe" in args:
        state = pop("states")
        if state == "ABSENT":
            sys.exit(print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: "
                           "projects/p/locations/z/nodes/sp not found", file=sys.stderr) or 1)
        print(state)
    elif "ssh" in args and any(a.endswith("status") for a in args):
        sys.exit(0 if pop("running") == "yes" else 3)
    elif "ssh" in args and any(" start " in a for a in args):  # the run writes its work dir
        shutil.copytree(here / "run_output", here / "bucket", dirs_exist_ok=True)
    elif args[:2] == ["storage", "cat"]:
        path = here / "bucket" / args[-1].split("/", 3)[-1]
        if not path.exists():
            sys.exit(print("ERROR: No URLs matched", file=sys.stderr) or 1)
        data = path.read_bytes()
        rng = [a for a in args if a.startswith("--range=-")]
        sys.stdout.write(data[-int(rng[0].split("-")[-1]):].decode() if rng else data.decode())
    """)


def test_babysit_real_path_with_a_fake_gcloud(tmp_path):
  """Not a dry run: state from `describe` (NOT_FOUND -> re-create), done from metrics.jsonl."""
  gcloud = tmp_path / "gcloud"
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  (tmp_path / "states").write_text("ABSENT\nREADY\nREADY\nREADY\n")
  (tmp_path / "running").write_text("no\nyes\nno\n")
  (tmp_path / "bucket").mkdir()
  output = tmp_path / "run_output" / "runs" / "tiny"  # appears once the job has started
  output.mkdir(parents=True)
  (output / "config.json").write_text(json.dumps({"train": {"steps": 300}}))
  rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(10, 301, 10))
  (output / "metrics.jsonl").write_text("x" * 70000 + "\n" + rows)  # the tail starts mid-line
  p = launch("tpu_vm.sh", "babysit", *SLICE, "--accelerator-type", "v5p-8", *JOB,
             "--git-url", "https://example.invalid/sptlm.git", "--skip-compile-check",
             "--poll-seconds", "0", "--max-iterations", "6", env={"SPTLM_GCLOUD": str(gcloud)})
  calls = [eval(line) for line in (tmp_path / "calls.log").read_text().splitlines()]  # noqa: S307
  words = [" ".join(c[2:4]) if c[0] == "compute" else " ".join(c[:2]) for c in calls]
  assert words == [
      "tpu-vm describe", "storage cat", "tpu-vm create",  # absent, no run yet: create it
      "tpu-vm describe", "tpu-vm ssh", "storage cat",  # ready, job not running: start it
      "tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",  # stop, copy, install, start
      "tpu-vm describe", "tpu-vm ssh",  # running
      "tpu-vm describe", "tpu-vm ssh", "storage cat", "storage cat"]  # stopped, and done
  assert calls[1][-1] == "gs://bkt/runs/tiny/config.json"  # no run yet: no config.json
  assert "--range=-65536" in calls[-1]
  assert "reached train.steps" in p.stderr


def test_babysit_steps_override_beats_config_json(tmp_path):
  gcloud = tmp_path / "gcloud"
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  (tmp_path / "states").write_text("READY\n")
  (tmp_path / "running").write_text("no\n")
  bucket = tmp_path / "bucket" / "runs" / "tiny"
  bucket.mkdir(parents=True)
  (bucket / "metrics.jsonl").write_text(json.dumps({"step": 300}) + "\n")
  (tmp_path / "run_output").mkdir()
  # train.steps raised to 600 on the command line: step 300 is not the end; start the job
  p = launch("tpu_vm.sh", "babysit", *SLICE, "--accelerator-type", "v5p-8", *JOB,
             "--config.train.steps=600", "--skip-compile-check", "--poll-seconds", "0",
             "--max-iterations", "1", "--git-url", "https://example.invalid/sptlm.git",
             env={"SPTLM_GCLOUD": str(gcloud)})
  assert "starting the job" in p.stderr


# ---- compile check ---------------------------------------------------------------------------

REPORT = textwrap.dedent("""\
    glm4_9b on v5p-128 (64 x TPU v5, topology v5p:4x4x4), compiled in 80.0 s
    mesh data=1 fsdp=64 tensor=1; batch 64 x 8192 tokens (1 per device); 9.40B params

    memory per device                       GB
      arguments (state, batch)           2.100
      outputs (new state)                2.100
      temporaries                       {temp}
      aliased (donated state)           -2.100
      total                             {total}   (50% of 95 GB HBM)
      generated code                     0.010
    """)


def fake_sptlm(tmp_path: pathlib.Path, total: float, rc: int = 0) -> str:
  path = tmp_path / "sptlm"
  report = REPORT.format(temp=f"{total - 2.1:10.3f}", total=f"{total:10.3f}")
  (tmp_path / "report.txt").write_text(report)
  path.write_text(f"#!/usr/bin/env bash\necho \"$@\" > {tmp_path}/argv\n"
                  + (f"cat {tmp_path}/report.txt\n" if rc == 0 else
                     "echo 'sptlm compile: error: unknown topology' >&2\n") + f"exit {rc}\n")
  path.chmod(0o755)
  return str(path)


@pytest.mark.parametrize("accel, total, fits", [
    ("v5p-128", 50.0, True), ("v5p-128", 93.0, False),  # 93 > 0.95 x 95
    ("v5litepod-16", 12.0, True), ("v5e-16", 15.5, False),  # 15.5 > 0.95 x 16
    ("v4-32", 30.0, True), ("v6e-8", 31.0, False),
])
def test_compile_check_decides_by_the_chip_hbm(tmp_path, accel, total, fits):
  sptlm = fake_sptlm(tmp_path, total)
  p = launch("tpu_vm.sh", "compile-check", "--accelerator-type", accel, *JOB,
             "--config.mesh.fsdp=-1", env={"SPTLM_BIN": sptlm}, expect_rc=0 if fits else 1)
  argv = (tmp_path / "argv").read_text().split()
  assert argv[:2] == ["compile", "--config"] and "--config.mesh.fsdp=-1" in argv
  assert ("compile check passed" in p.stderr) == fits
  assert ("does not fit" in p.stderr) == (not fits)


def test_compile_check_hbm_fraction_and_per_device_batch(tmp_path):
  sptlm = fake_sptlm(tmp_path, 93.0)
  launch("tpu_vm.sh", "compile-check", "--accelerator-type", "v5p-128", *JOB,
         "--hbm-fraction", "1.0", "--per-device-batch", "2", env={"SPTLM_BIN": sptlm})
  assert "--per-device-batch 2" in (tmp_path / "argv").read_text()


def test_a_failing_compile_check_stops_create_before_gcloud(tmp_path):
  sptlm = fake_sptlm(tmp_path, 120.0)
  gcloud = tmp_path / "gcloud-called"
  p = launch("tpu_vm.sh", "create", *SLICE, "--accelerator-type", "v5p-128", *JOB,
             env={"SPTLM_BIN": sptlm, "SPTLM_GCLOUD": str(gcloud)}, expect_rc=1)
  assert "does not fit v5p-128" in p.stderr and "--skip-compile-check" in p.stderr
  assert not gcloud.exists()
  p = launch("tpu_vm.sh", "compile-check", "--accelerator-type", "v5p-128", *JOB,
             env={"SPTLM_BIN": fake_sptlm(tmp_path, 1.0, rc=1)}, expect_rc=1)
  assert "unknown topology" in p.stderr


def test_compile_check_rejects_unknown_accelerators():
  p = launch("tpu_vm.sh", "compile-check", "--accelerator-type", "h100-8", *JOB, expect_rc=1)
  assert "GEN-N" in p.stderr or "generation" in p.stderr


@pytest.mark.slow
def test_compile_check_with_the_real_sptlm_compile():
  pytest.importorskip("libtpu", reason="needs libtpu: pip install 'sptlm[tpu-aot]'")
  p = launch("tpu_vm.sh", "compile-check", "--accelerator-type", "v5p-8", *JOB,
             "--config.mesh.data=-1", env={"SPTLM_BIN": str(ROOT / ".venv/bin/sptlm")}
             if (ROOT / ".venv/bin/sptlm").exists() else {})
  assert "compile check passed" in p.stderr and "v5p-8" in p.stderr


# ---- the worker script -----------------------------------------------------------------------

FAKE_TRAIN = textwrap.dedent("""\
    #!/usr/bin/env bash
    [[ ${1:-} != --help ]] || exit 0
    echo "fake $* cwd=$PWD hosts=${TPU_WORKER_HOSTNAMES:-}" \\
        "mega=${MEGASCALE_COORDINATOR_ADDRESS:-} foo=${FOO:-}"
    trap 'echo "SIGTERM: checkpoint saved"; exit 0' TERM
    while true; do sleep 0.05; done
    """)


@pytest.fixture
def worker_home(tmp_path):
  home = tmp_path / "home"
  (home / "sptlm").mkdir(parents=True)
  (home / "sptlm-venv" / "bin").mkdir(parents=True)
  train = home / "sptlm-venv" / "bin" / "sptlm"
  train.write_text(FAKE_TRAIN)
  train.chmod(0o755)
  (tmp_path / "tpu-env").write_text("ACCELERATOR_TYPE: 'v5p-16'\n"
                                    "TPU_WORKER_HOSTNAMES: '10.0.0.2,10.0.0.3'\nWORKER_ID: '1'\n"
                                    "MEGASCALE_COORDINATOR_ADDRESS: '10.0.0.9:8080'\n")
  shutil.copy(LAUNCH / "worker.sh", home / "sptlm-worker.sh")
  return home


def worker(home: pathlib.Path, *args: str, rc: int = 0, **env: str) -> str:
  full_env = dict(os.environ, HOME=str(home), SPTLM_WORKER_HOME=str(home),
                  SPTLM_TPU_ENV_URL=f"file://{home.parent / 'tpu-env'}", **env)
  full_env.pop("TPU_WORKER_HOSTNAMES", None)
  full_env.pop("MEGASCALE_COORDINATOR_ADDRESS", None)
  p = subprocess.run(["bash", "sptlm-worker.sh", *args], cwd=home, env=full_env,
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == rc, p.stdout + p.stderr
  return p.stdout + p.stderr


def test_worker_starts_detached_and_stops_with_sigterm(worker_home):
  assert "not running; last exit code none" in worker(worker_home, "status", rc=3)
  out = worker(worker_home, "start", "--env", "FOO=bar", "--", "sptlm", "train", "--config",
               "configs/tiny.py", "--workdir", "gs://b/r x")
  pid = int(re.search(r"started pid (\d+)", out).group(1))
  assert "already running" in worker(worker_home, "start", "--", "sptlm", "train", rc=1)
  assert f"running, pid {pid}" in worker(worker_home, "status")
  assert "stopped, exit code 0" in worker(worker_home, "stop", "--timeout", "10")
  assert "last exit code 0" in worker(worker_home, "status", rc=3)
  log = worker(worker_home, "logs", "--lines", "10")
  assert (f"fake train --config configs/tiny.py --workdir gs://b/r x cwd={worker_home}/sptlm "
          "hosts=10.0.0.2,10.0.0.3 mega=10.0.0.9:8080 foo=bar") in log
  assert "SIGTERM: checkpoint saved" in log and "exit code 0" in log
  assert "not running" in worker(worker_home, "stop")


def test_worker_install_unpacks_the_archive_and_pins_jax(worker_home, tmp_path):
  src = tmp_path / "src"
  (src / "configs").mkdir(parents=True)
  (src / "configs" / "tiny.py").write_text("# config\n")
  with tarfile.open(worker_home / "sptlm.tar.gz", "w:gz") as tar:
    tar.add(src / "configs", arcname="configs")
  uv = tmp_path / "uv"
  uv.write_text(f"#!/usr/bin/env bash\necho \"$@\" >> {tmp_path}/uv.log\n")
  uv.chmod(0o755)
  (worker_home / "sptlm" / "stale.txt").write_text("from the last install")
  out = worker(worker_home, "install", "--archive", "sptlm.tar.gz", "--jax-version", "0.10.2",
               SPTLM_UV=str(uv))
  assert "installed" in out
  assert (worker_home / "sptlm" / "configs" / "tiny.py").exists()
  assert not (worker_home / "sptlm" / "stale.txt").exists()
  uv_calls = (tmp_path / "uv.log").read_text().splitlines()
  venv = worker_home / "sptlm-venv"
  assert uv_calls == [f"venv -q --python 3.11 {venv}",
                      f"pip install -q --python {venv}/bin/python -e {worker_home}/sptlm "
                      "jax[tpu]==0.10.2"]


# ---- xpk.sh ----------------------------------------------------------------------------------

XPK_ARGS = ["--cluster", "tpu-cluster", "--workload", "glm9b", "--project", "proj", "--zone",
            "us-east5-a", "--tpu-type", "v5p-256", "--num-slices", "2", "--spot", *JOB]


def xpk_create(*extra: str) -> list[str]:
  p = launch("xpk.sh", "create", *XPK_ARGS, *extra, "--dry-run")
  return [c for c in commands(p) if c[:3] == ["xpk", "workload", "create"]][0]


def test_xpk_create_with_an_image():
  argv = xpk_create("--docker-image", "gcr.io/proj/sptlm:abc", "--max-restarts", "20",
                    "--config.train.steps=100", "--env", "LIBTPU_INIT_ARGS=--x=1")
  assert (flag(argv, "--cluster"), flag(argv, "--workload")) == ("tpu-cluster", "glm9b")
  assert (flag(argv, "--tpu-type"), flag(argv, "--num-slices")) == ("v5p-256", "2")
  assert flag(argv, "--max-restarts") == "20" and "--spot" in argv
  assert flag(argv, "--docker-image") == "gcr.io/proj/sptlm:abc"
  assert (flag(argv, "--project"), flag(argv, "--zone")) == ("proj", "us-east5-a")
  assert flag(argv, "--env") == "LIBTPU_INIT_ARGS=--x=1"
  assert shlex.split(flag(argv, "--command")) == [
      "sptlm", "train", "--config", "configs/tiny.py", "--workdir", "gs://bkt/runs/tiny",
      "--config.train.steps=100"]


def test_xpk_create_from_a_base_image_installs_the_shipped_checkout():
  p = launch("xpk.sh", "create", *XPK_ARGS, "--dry-run")
  cmds = commands(p)
  assert [kind(c) for c in cmds] == ["sptlm compile", "git archive", "mkdir", "tar", "xpk"]
  argv = cmds[-1]
  assert flag(argv, "--base-docker-image") == "python:3.11"
  assert flag(argv, "--script-dir") == flag(cmds[3], "-C")  # the unpacked git archive
  assert flag(argv, "--max-restarts") == "50"
  command = flag(argv, "--command")
  assert command.startswith(f"pip install -q -e . 'jax[tpu]=={PYPROJECT_JAX}' && sptlm train ")


def test_xpk_list_logs_delete_and_build_image():
  (listing,) = commands(launch("xpk.sh", "list", *XPK_ARGS, "--dry-run"))
  assert listing[:3] == ["xpk", "workload", "list"] and flag(listing, "--filter-by-job") == "glm9b"
  (delete,) = commands(launch("xpk.sh", "delete", *XPK_ARGS, "--xpk-dry-run", "--dry-run"))
  assert delete[:3] == ["xpk", "workload", "delete"] and delete[-1] == "--dry-run"
  creds, logs = commands(launch("xpk.sh", "logs", *XPK_ARGS, "--dry-run"))
  assert creds[:5] == ["gcloud", "container", "clusters", "get-credentials", "tpu-cluster"]
  assert flag(creds, "--location") == "us-east5"
  assert logs[:3] == ["kubectl", "logs", "--follow"] and "jobset-name=glm9b" in flag(
      logs, "--selector")
  cmds = commands(launch("xpk.sh", "build-image", "--docker-image", "gcr.io/p/s:1", "--dry-run"))
  assert [c[0] for c in cmds] == ["git", "mkdir", "tar", "docker", "docker"]
  assert flag(cmds[3], "--build-arg") == f"JAX_VERSION={PYPROJECT_JAX}"
  assert cmds[4] == ["docker", "push", "gcr.io/p/s:1"]


def test_xpk_create_needs_a_bucket():
  p = launch("xpk.sh", "create", *XPK_ARGS[:-1], "runs/local", "--dry-run", expect_rc=1)
  assert "gs://" in p.stderr


def _xpk_python() -> str | None:
  """The interpreter of an installed xpk (XPK or PATH), read from its console script."""
  exe = os.environ.get("XPK") or shutil.which("xpk")
  if not exe or not os.path.exists(exe):
    return None
  first = pathlib.Path(exe).read_text(errors="replace").splitlines()[0]
  return first[2:].strip() if first.startswith("#!") else None


XPK_PARSE = textwrap.dedent("""\
    # Parses each [subcommand, argv] of stdin's JSON list with xpk's own argparse setup.
    import argparse, json, sys
    from xpk.parser import workload
    setters = {"create": workload.set_workload_create_parser,
               "delete": workload.set_workload_delete_parser,
               "list": workload.set_workload_list_parser}
    out = []
    for command, argv in json.load(sys.stdin):
        parser = argparse.ArgumentParser(prog="xpk workload " + command)
        setters[command](parser)
        args = parser.parse_args(argv)
        out.append({k: v for k, v in vars(args).items() if k != "func"})
    print(json.dumps(out, default=str))
    """)


def test_xpk_command_lines_parse_with_xpks_own_parser(tmp_path):
  """Our xpk command lines, parsed by the installed xpk's argparse setup (one process)."""
  python = _xpk_python()
  if python is None:
    pytest.skip("xpk is not installed (pip install xpk; or set XPK=/path/to/xpk): its own "
                "parser checks our command lines")
  image = xpk_create("--docker-image", "gcr.io/proj/sptlm:abc", "--priority", "high",
                     "--env", "A=1", "--xpk-dry-run")
  base = commands(launch("xpk.sh", "create", *XPK_ARGS, "--dry-run"))[-1]
  base[base.index("--script-dir") + 1] = str(tmp_path)  # xpk checks that it exists
  (delete,) = commands(launch("xpk.sh", "delete", *XPK_ARGS, "--dry-run"))
  (listing,) = commands(launch("xpk.sh", "list", *XPK_ARGS, "--dry-run"))
  batch = [[c[2], c[3:]] for c in (image, base, delete, listing)]
  p = subprocess.run([python, "-c", XPK_PARSE], input=json.dumps(batch), capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  parsed, parsed_base, parsed_delete, parsed_list = json.loads(p.stdout)
  assert (parsed["cluster"], parsed["workload"], parsed["tpu_type"]) == (
      "tpu-cluster", "glm9b", "v5p-256")
  assert (parsed["num_slices"], str(parsed["max_restarts"]), parsed["spot"]) == (2, "50", True)
  assert parsed["docker_image"] == "gcr.io/proj/sptlm:abc" and parsed["env"] == ["A=1"]
  assert parsed["command"].startswith("sptlm train --config configs/tiny.py")
  assert parsed["dry_run"] is True and parsed["priority"] == "high"
  assert (parsed["project"], parsed["zone"]) == ("proj", "us-east5-a")
  assert parsed_base["base_docker_image"] == "python:3.11"
  assert parsed_base["script_dir"] == str(tmp_path)
  assert (parsed_delete["cluster"], parsed_delete["workload"]) == ("tpu-cluster", "glm9b")
  assert parsed_list["filter_by_job"] == "glm9b"
