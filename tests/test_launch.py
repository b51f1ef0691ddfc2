"""launch/: the commands the TPU VM and xpk launchers would run, read from their --dry-run.

The launchers run as the user runs them (bash launch/*.sh, in a subprocess) with neither gcloud
nor xpk needed: dry runs print `DRY-RUN: <argv>` lines (tests/launch_helpers.py reads them). This
file: tpu_vm.sh's single commands, the compile check, and the worker script under a temporary
HOME; the babysitter is in test_launch_babysit.py, xpk.sh in test_launch_xpk.py.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest

from launch_helpers import (JOB, LAUNCH, PYPROJECT_JAX, ROOT, SLICE, XPK_ARGS, commands, flag,
                            kind, launch, remote)


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
