"""Spoken question answering: the question files and the paper's answer matching.

Inputs (contracts.md):
- LLaMA Questions TSV with a header `Questions<TAB>Answer[<TAB>Wav Filename]`: one gold answer
  per row; audio paths are relative to the TSV.
- WebQuestions JSON: a list of `{"qText": ..., "answers": [...]}` (`qId` used when present).

An output is correct when a normalised gold answer (lower case, punctuation and the articles
a/an/the removed, spaces collapsed) appears in the normalised output, as the paper scores it.
"""

import csv
import dataclasses
import io
import json
import re
import string

from etils import epath

from sptlm.errors import InputError

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}‘’“”–—…]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclasses.dataclass(frozen=True)
class Question:
  id: str
  text: str
  answers: tuple[str, ...]
  audio: str | None = None  # a WAV file of the spoken question (absolute or relative to cwd)


def normalize(text: str) -> str:
  """Lower case, no punctuation, no articles, single spaces."""
  text = _PUNCT.sub(" ", text.lower())
  return " ".join(_ARTICLES.sub(" ", text).split())


def is_correct(prediction: str, answers: tuple[str, ...]) -> bool:
  """A normalised gold answer occurs in the normalised prediction (on word boundaries)."""
  pred = f" {normalize(prediction)} "
  return any(g and f" {g} " in pred for g in (normalize(a) for a in answers))


def read(path: str) -> tuple[list[Question], dict[str, int]]:
  """Questions of a LLaMA Questions TSV or a WebQuestions JSON file, and what was skipped."""
  from sptlm.eval.storycloze import read_utf8
  text = read_utf8(path, "spoken QA file")
  p = epath.Path(path)
  if path.endswith(".json") or text.lstrip().startswith("["):
    return _read_webquestions(path, text)
  return _read_tsv(p, text)


def _read_webquestions(path: str, text: str) -> tuple[list[Question], dict[str, int]]:
  try:
    rows = json.loads(text)
  except json.JSONDecodeError as e:
    raise InputError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
  if not isinstance(rows, list):
    raise InputError(f"{path}: WebQuestions JSON is a list of {{\"qText\", \"answers\"}}")
  out, skipped = [], {}
  for k, row in enumerate(rows):
    why = _webq_problem(row)
    if why:
      skipped[why] = skipped.get(why, 0) + 1
      continue
    out.append(Question(str(row.get("qId", k)), row["qText"].strip(),
                        tuple(a.strip() for a in row["answers"] if a.strip())))
  return out, skipped


def _webq_problem(row: object) -> str | None:
  if not isinstance(row, dict) or not isinstance(row.get("qText"), str):
    return "malformed rows"
  if not row["qText"].strip():
    return "empty questions"
  answers = row.get("answers")
  if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
    return "malformed rows"
  if not any(a.strip() for a in answers):
    return "empty answer lists"
  return None


def _read_tsv(p: epath.Path, text: str) -> tuple[list[Question], dict[str, int]]:
  reader = csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
  fields = reader.fieldnames or []
  if "Questions" not in fields or "Answer" not in fields:
    raise InputError(f"{p} lacks the LLaMA Questions header Questions<TAB>Answer"
                     f"[<TAB>Wav Filename] (has: {', '.join(fields)})")
  with_audio = "Wav Filename" in fields
  out, skipped = [], {}
  for k, row in enumerate(reader):
    q, a = (row.get("Questions") or "").strip(), (row.get("Answer") or "").strip()
    wav = (row.get("Wav Filename") or "").strip() if with_audio else ""
    why = ("malformed rows" if None in row or any(v is None for v in row.values()) else
           "empty questions" if not q else "empty answer lists" if not a else
           "rows without a Wav Filename" if with_audio and not wav else None)
    if why:
      skipped[why] = skipped.get(why, 0) + 1
      continue
    audio = str(p.parent / wav) if wav else None
    out.append(Question(str(k), q, (a,), audio))
  return out, skipped
