"""launch/tpu_vm.sh babysit: recreate a preempted slice and restart the job, read from --dry-run
with the slice's answers stubbed (SPTLM_LAUNCH_STUB_*), and once through a fake gcloud."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

from launch_helpers import JOB, LAUNCH, SLICE, commands, flag, kind, launch, remote


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
