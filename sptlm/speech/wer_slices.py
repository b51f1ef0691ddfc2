"""WER and CER of an `evaluate --transcripts` file, sliced by text source and by voice.

A split's WER mixes two things a reader wants apart: how hard the sentences are for the LM (a
Shakespeare line against a modern fortune) and how hard the voice is for the acoustic model (an
espeak-ng accent against another). Each utterance's reference is traced back to the corpus
source it came from (corpus.json lists them), and its voice to the accent or voice name before
any `+variant`, so the same transcripts can be read either way without a new evaluation.
"""

import collections
import dataclasses
import json
import pathlib
from collections.abc import Iterable, Sequence

from sptlm.errors import InputError, MissingFileError
from sptlm.speech.corpus import normalize_text, read_sentences

UNMATCHED = "(no source)"


@dataclasses.dataclass
class Tally:
  utterances: int = 0
  words: int = 0
  word_edits: int = 0
  chars: int = 0
  char_edits: int = 0

  def add(self, row: dict) -> None:
    self.utterances += 1
    self.words += row["words"]
    self.word_edits += row["word_edits"]
    self.chars += row["chars"]
    self.char_edits += row["char_edits"]

  @property
  def wer(self) -> float:
    return self.word_edits / max(self.words, 1)

  @property
  def cer(self) -> float:
    return self.char_edits / max(self.chars, 1)


def source_labels(sources: Sequence[str | pathlib.Path], *, log=print) -> dict[str, str]:
  """Normalized sentence -> the name of the first source that has it. Sources that share a
  folder with another (Debian's fortune files) are named by the folder; a source that is gone
  is left out with one line, its sentences then count as unmatched."""
  paths = [pathlib.Path(s) for s in sources]
  per_parent = collections.Counter(p.parent for p in paths)
  labels: dict[str, str] = {}
  for p in paths:
    name = p.parent.name if per_parent[p.parent] > 1 else p.stem
    try:
      sentences = read_sentences(p)
    except MissingFileError as e:
      log(f"wer_slices: {e}; its sentences count as {UNMATCHED!r}")
      continue
    for s in sentences:
      labels.setdefault(normalize_text(s), name)
  return labels


def voice_family(voice: str) -> str:
  """espeak-ng's `en-gb-scotland+m3` -> `en-gb-scotland` (the accent); other voices as named."""
  return voice.split("+", 1)[0]


def read_transcripts(path: str | pathlib.Path) -> list[dict]:
  """The JSON lines `sptlm tokenizer evaluate --transcripts` writes."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise MissingFileError(f"transcripts file not found: {path} (write one with `sptlm "
                           "tokenizer evaluate ... --transcripts FILE`)")
  rows = []
  need = ("split", "engine", "voice", "condition", "ref", "words", "word_edits", "chars",
          "char_edits")
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
    missing = [k for k in need if k not in row]
    if missing:
      raise InputError(f"{path}:{n}: missing {', '.join(missing)}; is this an `evaluate "
                       "--transcripts` file?")
    rows.append(row)
  if not rows:
    raise InputError(f"{path}: no transcripts")
  return rows


def slice_rows(rows: Iterable[dict], labels: dict[str, str], by: Sequence[str]
               ) -> dict[tuple[str, ...], Tally]:
  """(split, condition, engine, *slices) -> Tally, plus each (split, condition, engine, 'all').

  by: any of "source" and "voice", in the order the slice keys should have."""
  for b in by:
    if b not in ("source", "voice"):
      raise InputError(f"unknown slice {b!r}: use source, voice or both")
  out: dict[tuple[str, ...], Tally] = collections.defaultdict(Tally)
  for r in rows:
    head = (r["split"], r["condition"], r["engine"])
    keys = {"source": labels.get(r["ref"], UNMATCHED), "voice": voice_family(r["voice"])}
    out[head + ("all",) * len(by)].add(r)
    if by:
      out[head + tuple(keys[b] for b in by)].add(r)
  return dict(out)


def table(tallies: dict[tuple[str, ...], Tally], by: Sequence[str]) -> str:
  head = ["split", "condition", "engine", *by, "utterances", "WER", "CER"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for key in sorted(tallies, key=lambda k: (k[:3], k[3:] != ("all",) * len(by), k[3:])):
    t = tallies[key]
    lines.append("| " + " | ".join([*key, str(t.utterances), f"{100 * t.wer:.1f}%",
                                     f"{100 * t.cer:.1f}%"]) + " |")
  return "\n".join(lines)
