"""Shared by the `sptlm tokenizer` end-to-end tests: the CLI in a subprocess, a tiny espeak-ng
corpus and a tokenizer trained on it (module-scoped fixtures: import them into a test module)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "speech_tokenizer_tiny.py")
SENTENCES = [
    "the cat sat on the mat", "a dog ran in the park", "we will go home now",
    "she sells sea shells", "the sun is hot today", "he reads a good book",
    "they play in the snow", "the bird sings a song", "my hat is red and blue",
    "you can see the sea", "the man has a big car", "it is time to eat",
]
TINY = ["--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.d_ff=64",
        "--config.model.layers_before_vq=1", "--config.model.layers_after_vq=1",
        "--config.model.token_rate_layers=1",
        "--config.vq.codebook_size=32", "--config.vq.restart_after=5", "--config.asr.units=40",
        "--config.data.bucket_seconds=(3.84,)", "--config.data.batch_seconds=32.0",
        "--config.data.eval_splits=()", "--config.train.warmup_steps=2",
        "--config.train.learning_rate=0.003", "--config.train.log_every=1",
        "--config.train.checkpoint_every=100", "--config.mesh.data=1"]

def entry_point() -> list[str]:
  """`sptlm tokenizer ...` through sptlm.cli once it registers the command group."""
  from sptlm import cli
  try:
    cli.build_parser().parse_args(["tokenizer", "train", "--help"])
  except SystemExit as e:
    if e.code == 0:
      return [sys.executable, "-m", "sptlm.cli"]
  return [sys.executable, "-m", "sptlm.speech.cli"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
  cache = tmp_path_factory.mktemp("jax_cache")  # later runs reuse the first run's compilation
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
              JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
  return subprocess.Popen([*entry_point(), "tokenizer", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(args: list[str], env: dict[str, str], code: int = 0) -> tuple[str, str]:
  proc = start(args, env)
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == code, err[-3000:]
  return out, err


def metrics(workdir: pathlib.Path) -> list[dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, env) -> pathlib.Path:
  root = tmp_path_factory.mktemp("speech")
  text = root / "sentences.txt"
  text.write_text("\n\n".join(s.capitalize() + "." for s in SENTENCES) + "\n")
  out = root / "corpus"
  run(["build-corpus", "--out", str(out), "--text", str(text), "--no-default-text",
        "--train", "8", "--test", "2", "--dev", "2", "--heldout-variants", "4", "--seed", "1"],
       env)
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir, env) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("run")
  # extra LM text: an unrelated document, and the corpus's own source (it holds the held-out
  # sentences, so it must be left out whole)
  extra = tmp_path_factory.mktemp("lm_text")
  (extra / "other.txt").write_text("The quokka smiles at the wombat.\n")
  (extra / "source.txt").write_text("\n\n".join(s.capitalize() + "." for s in SENTENCES))
  run(["train", "--config", CONFIG, "--workdir", str(workdir),
        f"--config.data.corpus={corpus_dir}", "--config.train.steps=40",
        f"--config.asr.lm_text=('{extra}',)", *TINY], env)
  return workdir
