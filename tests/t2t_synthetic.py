"""A synthetic language for text-to-token tests and the tiny t2t model trained on it.

Pairs come from a known code for each character (two speech codes per letter), so a round trip
(text -> t2t tokens -> that code read back -> text) measures what the model learned. The model
is trained once per test session (conftest's `trained_t2t`) through the real entry point.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from sptlm.t2t import units as units_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "t2t_tiny.py")
K = 64  # speech codes
WORDS = ("the cat sat on a mat we go home now she sells sea shells by the shore a dog ran far "
         "in the park my hat is red and blue you can see the big car it is time to eat").split()


def _codes(text: str) -> np.ndarray:
  """The speech codes of a text in the synthetic language: two per character."""
  return np.array([c for ch in text for c in ((ord(ch) * 5) % K, (ord(ch) * 3 + 1) % K)],
                  np.int32)


def _read_back(codes: np.ndarray) -> str:
  table = {((ord(ch) * 5) % K, (ord(ch) * 3 + 1) % K): ch for ch in units_lib.ALPHABET}
  return "".join(table.get((int(a), int(b)), "?") for a, b in zip(codes[::2], codes[1::2]))


def _sentences(n: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=rng.integers(2, 5))) for _ in range(n)]


def _cer(refs: list[str], hyps: list[str]) -> float:
  def dist(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
      prev, row[0] = row[0], i
      for j, cb in enumerate(b, 1):
        prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]
  return sum(dist(r, h) for r, h in zip(refs, hyps)) / sum(len(r) for r in refs)


TINY = ["--config.model.num_layers=2", "--config.model.d_model=64", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=2", "--config.model.head_dim=32", "--config.model.d_ff=128",
        f"--config.vocab.speech_size={K}", "--config.data.seq_len=128",
        "--config.data.global_batch_size=8", "--config.data.max_text_units=40",
        "--config.data.max_speech_tokens=80", "--config.train.warmup_steps=20",
        "--config.train.learning_rate=0.01", "--config.train.min_learning_rate=0.001",
        "--config.train.log_every=10", "--config.train.checkpoint_every=100",
        "--config.mesh.data=1", "--config.synth.batch_size=8", "--config.synth.prompt_bucket=16",
        "--config.synth.max_text_units=40", '--config.data.tokenizer=',
        '--config.data.corpus=']


def train(root: pathlib.Path) -> pathlib.Path:
  """Trains the tiny t2t model on 600 synthetic pairs (plus 3 bad lines); its work dir."""
  pairs = root / "pairs.jsonl"
  lines = [json.dumps({"text": t, "tokens": _codes(t).tolist()}) for t in _sentences(600, 0)]
  lines += ["not json", json.dumps({"text": "", "tokens": [1]}),
            json.dumps({"text": "x", "tokens": [K + 5]})]
  pairs.write_text("\n".join(lines) + "\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-m", "sptlm.cli", "t2t", "train", "--config", CONFIG,
                         "--workdir", str(root / "run"), f"--config.data.pairs=('{pairs}',)",
                         "--config.train.steps=300", *TINY], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "600 pairs (1 unreadable, 1 empty text, 1 out-of-range tokens skipped)" in proc.stdout
  return root / "run"




def data_config(path: pathlib.Path, t2t: pathlib.Path | str, tasks: str, batch: int = 8,
                speech_size: int = K, speech_tokenizer: pathlib.Path | str = "") -> pathlib.Path:
  """Writes a data config (kind = "data") over the tiny SentencePiece model, `speech_size`
  codes (the synthetic language's K by default) and the t2t model at `t2t`; `tasks` is the
  Python dict of its tasks."""
  path.write_text(f'''
import ml_collections
def get_config():
  c = ml_collections.ConfigDict()
  c.name = "data_test"
  c.kind = "data"
  c.vocab = dict(text_tokenizer="{ROOT / 'data_pipelines' / 'assets' / 'tiny_sp1024.model'}",
                 text_size=1024, speech_size={speech_size}, speech_tokenizer="{speech_tokenizer}")
  c.interleave = dict(lam=10.0, eta=0.3, seed=0, t2t="{t2t}", batch={batch})
  c.tasks = {tasks}
  return c
''')
  return path
