"""What the TPU VM and xpk launchers share: dry-run command execution, the checkout, the
compile check. Standard library only, so the launchers run from any Python 3.8+.

Every external command goes through a Runner. With --dry-run it prints each command on stdout
as `DRY-RUN: <shell-quoted argv>` and runs nothing; commands whose answer steers the launcher
(a slice's state, whether the job runs, whether the run finished) then take their answers from
SPTLM_LAUNCH_STUB_<KIND> (comma-separated, one per query, the last repeating), so a dry run of
the babysitter can be driven through a preemption.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

REPO = pathlib.Path(__file__).resolve().parent.parent
DRY_RUN_PREFIX = "DRY-RUN: "

# HBM per chip (one JAX device: v4 and v5p run their two TensorCores as one megacore), in GB of
# 1e9 bytes as `sptlm compile` prints memory.
HBM_GB = {"v4": 32.0, "v5p": 95.0, "v5litepod": 16.0, "v6e": 32.0}
# The TPU VM software each generation boots (gcloud --version / --runtime-version).
RUNTIME_VERSION = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5",
                   "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
_GENERATION_ALIASES = {"v5e": "v5litepod", "v6litepod": "v6e"}


class LaunchError(Exception):
  """A problem the user can fix; printed as one line."""


def log(prog: str, message: str) -> None:
  print(f"{prog}: {message}", file=sys.stderr, flush=True)


# ---- Accelerator types -----------------------------------------------------------------------

def accelerator(name: str) -> Tuple[str, str]:
  """`v5e-16` or `v5litepod-16` -> ("v5litepod-16", "v5litepod"): gcloud's and xpk's spelling."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
  if not m:
    raise LaunchError(f"accelerator type {name!r} is not GEN-N, e.g. v5p-128, v5litepod-16, "
                      "v6e-64, v4-32")
  gen = _GENERATION_ALIASES.get(m.group(1), m.group(1))
  if gen not in HBM_GB:
    raise LaunchError(f"unknown TPU generation {m.group(1)!r} in {name!r} (known: "
                      f"{', '.join(sorted(HBM_GB))}, v5e)")
  return f"{gen}-{m.group(2)}", gen


# ---- Running commands ------------------------------------------------------------------------

class Runner:
  """Runs commands, or with dry_run prints them (one per line, DRY_RUN_PREFIX) and runs none."""

  def __init__(self, prog: str, dry_run: bool):
    self.prog = prog
    self.dry_run = dry_run
    self._stub_calls: Dict[str, int] = {}

  def show(self, argv: Sequence[str]) -> None:
    print(DRY_RUN_PREFIX + shlex.join(list(argv)), flush=True)

  def run(self, argv: Sequence[str], what: str = "") -> None:
    """Runs one command with its output on the terminal; a failure stops the launcher."""
    if self.dry_run:
      self.show(argv)
      return
    log(self.prog, "running: " + shlex.join(list(argv)))
    try:
      rc = subprocess.call(list(argv))
    except FileNotFoundError:
      raise LaunchError(f"{argv[0]} not found; install it (see launch/README.md)") from None
    if rc != 0:
      raise LaunchError(f"{what or argv[0]} failed with exit code {rc}: {shlex.join(list(argv))}")

  def run_all(self, commands: Sequence[Sequence[str]], what: str) -> None:
    """Runs commands at once (one per slice of a multislice job); all must succeed."""
    if self.dry_run or len(commands) == 1:
      for argv in commands:
        self.run(argv, what)
      return
    procs = []
    for argv in commands:
      log(self.prog, "running: " + shlex.join(list(argv)))
      try:
        procs.append((argv, subprocess.Popen(list(argv))))
      except FileNotFoundError:
        raise LaunchError(f"{argv[0]} not found; install it (see launch/README.md)") from None
    failed = [shlex.join(list(argv)) for argv, p in procs if p.wait() != 0]
    if failed:
      raise LaunchError(f"{what} failed: {'; '.join(failed)}")

  def capture(self, argv: Sequence[str]) -> Tuple[int, str, str]:
    """Runs a command for its answer: (exit code, stdout, stderr). Not in a dry run: there
    the caller prints the command and takes its answer from stub()."""
    assert not self.dry_run
    try:
      p = subprocess.run(list(argv), capture_output=True, text=True)
    except FileNotFoundError:
      raise LaunchError(f"{argv[0]} not found; install it (see launch/README.md)") from None
    return p.returncode, p.stdout, p.stderr

  def stub(self, kind: str, default: str) -> str:
    """A dry run's answer to a query: the next of SPTLM_LAUNCH_STUB_<kind>, else default."""
    values = [v.strip() for v in os.environ.get(f"SPTLM_LAUNCH_STUB_{kind}", "").split(",")
              if v.strip()]
    if not values:
      return default
    i = self._stub_calls.get(kind, 0)
    self._stub_calls[kind] = i + 1
    answer = values[min(i, len(values) - 1)]
    log(self.prog, f"(dry run) {kind.lower()} -> {answer}")
    return answer


# ---- The checkout ----------------------------------------------------------------------------

def jax_version() -> str:
  """The jax pinned in pyproject.toml: workers install jax[tpu] at exactly this version."""
  text = (REPO / "pyproject.toml").read_text()
  m = re.search(r'"jax==([^"]+)"', text)
  if not m:
    raise LaunchError("pyproject.toml pins no jax version (expected \"jax==X\" in dependencies)")
  return m.group(1)


def repo_config_path(config: str) -> str:
  """The config as a path inside the checkout, which is what the workers have."""
  p = pathlib.Path(config).expanduser()
  candidates = [p] if p.is_absolute() else [pathlib.Path.cwd() / p, REPO / p]
  for c in candidates:
    if c.is_file():
      try:
        return c.resolve().relative_to(REPO).as_posix()
      except ValueError:
        raise LaunchError(f"--config {config} is outside the checkout {REPO}; the workers get "
                          "the checkout, so put the config under configs/") from None
  raise LaunchError(f"--config {config}: no such file (paths are relative to the checkout, "
                    "e.g. configs/glm4_9b.py)")


def warn_if_dirty(prog: str, ref: str) -> None:
  try:
    out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return
  if out.strip():
    log(prog, f"warning: the checkout has uncommitted changes; only {ref} is shipped "
        "(commit them, or pass --ref)")


def git_archive_command(ref: str, out: str, fmt: str = "tar.gz") -> List[str]:
  return ["git", "-C", str(REPO), "archive", f"--format={fmt}", "-o", out, ref]


@contextlib.contextmanager
def staging(runner: Runner, name: str) -> Iterator[pathlib.Path]:
  """A scratch folder for what gets shipped; a dry run only names one."""
  if runner.dry_run:
    yield pathlib.Path(tempfile.gettempdir()) / f"sptlm-{name}-DRYRUN"
    return
  path = pathlib.Path(tempfile.mkdtemp(prefix=f"sptlm-{name}-"))
  try:
    yield path
  finally:
    shutil.rmtree(path, ignore_errors=True)


# ---- Config overrides ------------------------------------------------------------------------

def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
  """`--config.a.b=1` (or `--config.a.b 1`) pass through to sptlm; the rest is the launcher's."""
  rest, overrides = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--config."):
      if "=" not in arg:
        value = next(it, None)
        if value is None:
          raise LaunchError(f"{arg} needs a value: {arg}=VALUE")
        arg = f"{arg}={value}"
      overrides.append(arg)
    else:
      rest.append(arg)
  return rest, overrides


def override_value(overrides: Sequence[str], key: str) -> Optional[str]:
  value = None
  for o in overrides:
    k, _, v = o[len("--config."):].partition("=")
    if k == key:
      value = v
  return value


def train_command(config: str, workdir: str, overrides: Sequence[str]) -> List[str]:
  return ["sptlm", "train", "--config", config, "--workdir", workdir, *overrides]


# ---- Compile check ---------------------------------------------------------------------------

def sptlm_binary() -> str:
  """SPTLM_BIN, else the checkout's .venv, else `sptlm` on PATH."""
  if os.environ.get("SPTLM_BIN"):
    return os.environ["SPTLM_BIN"]
  local = REPO / ".venv" / "bin" / "sptlm"
  return str(local) if local.exists() else "sptlm"


def total_gb(report: str) -> float:
  """Memory per device from `sptlm compile`'s report (its `total` row, in GB)."""
  m = re.search(r"^\s*total\s+(-?[0-9]+(?:\.[0-9]*)?)", report, re.MULTILINE)
  if not m:
    raise LaunchError("`sptlm compile` printed no `total` memory row; is this sptlm too old "
                      "or too new for launch/? (pass --skip-compile-check to go on unchecked)")
  return float(m.group(1))


def decide(report: str, accelerator_type: str, hbm_fraction: float) -> Tuple[bool, str]:
  """Whether the compiled step fits the chip's HBM, and a line that says so."""
  _, gen = accelerator(accelerator_type)
  need = total_gb(report)
  have = HBM_GB[gen]
  limit = have * hbm_fraction
  verdict = (f"needs {need:.2f} GB per device; a {gen} chip has {have:g} GB "
             f"(limit {limit:.2f} GB at --hbm-fraction {hbm_fraction:g})")
  return need <= limit, verdict


def add_compile_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("compile check (`sptlm compile` on this machine, before paying)")
  g.add_argument("--skip-compile-check", action="store_true",
                 help="start without compiling for the topology first")
  g.add_argument("--per-device-batch", type=int,
                 help="passed to sptlm compile (default: data.global_batch_size / devices)")
  g.add_argument("--hbm-fraction", type=float, default=0.95,
                 help="refuse when the step needs more than this share of a chip's HBM "
                 "(default 0.95: the TPU runtime keeps some for itself)")


def compile_check(prog: str, runner: Runner, config: str, accelerator_type: str,
                  overrides: Sequence[str], per_device_batch: Optional[int],
                  hbm_fraction: float, num_slices: int = 1) -> None:
  """Compiles the train step for the slice here; refuses (LaunchError) unless it fits HBM."""
  topology, _ = accelerator(accelerator_type)
  argv = [sptlm_binary(), "compile", "--config", str(REPO / config), "--topology", topology]
  if per_device_batch:
    argv += ["--per-device-batch", str(per_device_batch)]
  argv += list(overrides)
  if num_slices > 1:
    log(prog, f"compile check covers one slice of {num_slices}; pass --per-device-batch with "
        "the multislice value (global batch / all devices) for an exact figure")
  if runner.dry_run:
    runner.show(argv)
    return
  log(prog, f"compile check: {shlex.join(argv)}")
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: no TPU here, libtpu describes the slice
  try:
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
  except FileNotFoundError:
    raise LaunchError(f"{argv[0]} not found: set up the checkout (bash scripts/setup.sh, then "
                      ".venv/bin/pip install -e '.[tpu-aot]') or set SPTLM_BIN") from None
  if p.returncode != 0:
    last = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["no output"])[-1]
    raise LaunchError(f"sptlm compile failed for {topology}: {last} (pass --skip-compile-check "
                      "to start anyway)")
  sys.stderr.write(p.stdout)
  ok, verdict = decide(p.stdout, topology, hbm_fraction)
  if not ok:
    raise LaunchError(f"{config} does not fit {topology}: {verdict}. Shard more (mesh.fsdp, "
                      "mesh.tensor), remat (model.remat), or lower --per-device-batch; "
                      "--skip-compile-check starts anyway")
  log(prog, f"compile check passed: {config} on {topology} {verdict}")


def command_parser(prog: str, doc: str, commands: Dict[str, object],
                   common: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """One sub-command per entry of `commands`, each with the shared flags; helps from `doc`."""
  parser = argparse.ArgumentParser(
      prog=prog, description=doc.split("\n\n")[0],
      epilog="--config.KEY=VALUE arguments pass through to sptlm train and sptlm compile.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  helps = dict(line.strip().split(None, 1) for line in doc.splitlines()
               if line.startswith("  ") and line.split()[0] in commands)
  for name in commands:
    sub.add_parser(name, parents=[common], help=helps[name], description=helps[name])
  return parser


def run_command(prog: str, parser: argparse.ArgumentParser, commands: Dict[str, object],
                argv: Optional[Sequence[str]]) -> int:
  """Parses, dispatches, and turns a LaunchError into one line on stderr."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, overrides = split_overrides(argv)
  except LaunchError as e:
    parser.exit(2, f"{prog}: error: {e}\n")
  args = parser.parse_args(rest)
  if args.num_slices < 1:
    parser.exit(2, f"{prog}: error: --num-slices must be at least 1\n")
  runner = Runner(prog, args.dry_run)
  try:
    return commands[args.command](args, overrides, runner)
  except LaunchError as e:
    print(f"{prog} {args.command}: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"{prog} {args.command}: interrupted", file=sys.stderr)
    return 130
