"""TTS pairs (transcript, speech codes): made once by a speech tokenizer, read by the trainer.

`make` encodes a corpus's audio with the tokenizer and writes JSON lines
{"id", "text", "tokens"} (raw codebook indices 0..K-1) in shards `SPLIT-NNNNN.jsonl` of a
directory, each under its final name only once complete, so a killed run keeps every finished
shard and a rerun skips them. `tokenizer.json` beside them records which tokenizer made them
(its path and a fingerprint of its codebook); synthesis refuses a tokenizer with another one.
`read` takes those shards, or any user's JSON lines {"text", "tokens"}.
"""

import dataclasses
import hashlib
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from sptlm.errors import InputError, MissingFileError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
SHARD_UTTERANCES = 256


def fingerprint(tokenizer: Any) -> str:
  """A SHA-256 of the tokenizer's codebook: codes mean the same only under the same one."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tokenizer.vq_state)[0]:
    if "codebook" in jax.tree_util.keystr(path):
      h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
  return h.hexdigest()[:16]


def identity(tokenizer_dir: str, tokenizer: Any) -> dict[str, Any]:
  return {"path": str(tokenizer_dir), "fingerprint": fingerprint(tokenizer),
          "codebook_size": int(tokenizer.codebook_size)}


def make(tokenizer_dir: str, corpus: str, out: str | pathlib.Path, splits: Sequence[str], *,
         cache_dir: pathlib.Path) -> dict[str, Any]:
  """Encodes every utterance of `splits` into pairs under `out`; returns the tokenizer identity.

  Finished shards are skipped; shards made by another tokenizer are an error.
  """
  from sptlm.speech import manifest
  from sptlm.speech.tokenizer import SpeechTokenizer
  out = epath.Path(out)
  tok = SpeechTokenizer.load(tokenizer_dir, lm=None)
  ident = identity(tokenizer_dir, tok)
  recorded = out / TOKENIZER_FILE
  if recorded.exists():
    old = json.loads(recorded.read_text())
    if old["fingerprint"] != ident["fingerprint"]:
      raise InputError(f"{out} holds pairs of another speech tokenizer ({old['path']}, "
                       f"codebook {old['fingerprint']}); {tokenizer_dir} has "
                       f"{ident['fingerprint']}: use a new directory")
  out.mkdir(parents=True, exist_ok=True)
  recorded.write_text(json.dumps(ident, indent=2) + "\n")
  source = manifest.open_source(corpus, cache_dir=cache_dir, splits=tuple(splits))
  for split in splits:
    utts = source.utterances(split)
    shards = [utts[i:i + SHARD_UTTERANCES] for i in range(0, len(utts), SHARD_UTTERANCES)]
    todo = [(i, s) for i, s in enumerate(shards) if not (out / _shard_name(split, i)).exists()]
    if not todo:
      continue
    bar = tqdm(total=sum(len(s) for _, s in todo), desc=f"pairs [{split}]", unit="utt",
               disable=jax.process_index() != 0)
    for i, shard in todo:
      codes = tok.encode([source.load(u) for u in shard])
      lines = [json.dumps({"id": u.id, "text": u.text, "tokens": c.tolist()})
               for u, c in zip(shard, codes)]
      tmp = out / (_shard_name(split, i) + ".tmp")
      tmp.write_text("\n".join(lines) + "\n")
      tmp.rename(out / _shard_name(split, i))
      bar.update(len(shard))
    bar.close()
  return ident


def _shard_name(split: str, i: int) -> str:
  return f"{split}-{i:05d}.jsonl"


@dataclasses.dataclass
class Pairs:
  """Pairs read from JSON lines, with what was skipped and why."""

  texts: list[str]
  tokens: list[np.ndarray]
  skipped: dict[str, int]

  def summary(self) -> str:
    skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items() if n) or "none"
    return f"{len(self.texts):,} pairs ({skipped} skipped)"


def files(specs: Sequence[str], split: str) -> list[pathlib.Path]:
  """The JSON-lines files of `specs`: files as given, directories' SPLIT-*.jsonl (or all
  *.jsonl when they hold no such shards)."""
  out = []
  for spec in specs:
    p = pathlib.Path(spec)
    if p.is_dir():
      found = sorted(p.glob(f"{split}-*.jsonl")) or ([] if split else sorted(p.glob("*.jsonl")))
      out.extend(found)
    elif p.is_file():
      out.append(p)
    else:
      raise MissingFileError(f"pairs {spec}: no such file or directory")
  return out


def read(paths: Sequence[pathlib.Path], codebook_size: int) -> Pairs:
  """Every readable pair; empty texts, empty or out-of-range tokens and lines that are not
  JSON or not UTF-8 are skipped and counted."""
  texts, tokens = [], []
  skipped = {"unreadable": 0, "empty text": 0, "empty tokens": 0, "out-of-range tokens": 0}
  for path in paths:
    for raw in path.read_bytes().splitlines():
      if not raw.strip():
        continue
      try:
        row = json.loads(raw.decode("utf-8"))
        text, toks = str(row["text"]), np.asarray(row["tokens"], np.int64).reshape(-1)
      except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        skipped["unreadable"] += 1
        continue
      if not text.strip():
        skipped["empty text"] += 1
      elif toks.size == 0:
        skipped["empty tokens"] += 1
      elif toks.min() < 0 or toks.max() >= codebook_size:
        skipped["out-of-range tokens"] += 1
      else:
        texts.append(text)
        tokens.append(toks.astype(np.int32))
  return Pairs(texts, tokens, skipped)
