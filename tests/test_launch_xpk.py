"""launch/xpk.sh: the xpk command lines from --dry-run, checked with xpk's own parser where xpk is
installed."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import textwrap

import pytest

from launch_helpers import PYPROJECT_JAX, XPK_ARGS, commands, flag, kind, launch


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
