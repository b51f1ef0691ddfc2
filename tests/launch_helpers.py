"""Shared by the launch/ tests: run a launcher's main in-process and read its DRY-RUN commands."""

import contextlib
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
PYPROJECT_JAX = re.search(r'"jax==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)

SLICE = ["--name", "sp", "--zone", "us-east5-a", "--project", "proj"]
JOB = ["--config", "configs/tiny.py", "--workdir", "gs://bkt/runs/tiny"]
XPK_ARGS = ["--cluster", "tpu-cluster", "--workload", "glm9b", "--project", "proj", "--zone",
            "us-east5-a", "--tpu-type", "v5p-256", "--num-slices", "2", "--spot", *JOB]


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
