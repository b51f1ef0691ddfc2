"""StoryCloze-style likelihood tasks: the CSV, sStoryCloze and tStoryCloze pairs.

CSV (contracts.md): InputStoryid, InputSentence1..4, RandomFifthSentenceQuiz1,
RandomFifthSentenceQuiz2, AnswerRightEnding (1 or 2). sStoryCloze keeps the story's own wrong
ending; tStoryCloze replaces it by the right ending of another story, drawn with a seeded
permutation (a topic change: the easier task).
"""

import csv
import dataclasses
import io
import json

import numpy as np
from etils import epath

from sptlm.errors import InputError, MissingFileError

COLUMNS = ("InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3",
           "InputSentence4", "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2",
           "AnswerRightEnding")


@dataclasses.dataclass(frozen=True)
class Story:
  id: str
  context: str  # the four sentences
  right: str
  wrong: str
  parts: tuple[str, ...] = ()  # the CSV's text by column: sentences 1-4, quiz endings 1-2


def read_utf8(path: str, what: str) -> str:
  """A data file's text; a missing file or one that is not UTF-8 is a one-line error."""
  p = epath.Path(path)
  if not p.exists():
    raise MissingFileError(f"{what} not found: {path}")
  try:
    return p.read_bytes().decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise InputError(f"{path} is not UTF-8 text (byte {e.start})") from None


def read_csv(path: str) -> tuple[list[Story], dict[str, int]]:
  """The stories of a StoryCloze CSV and the count of rows skipped (malformed)."""
  text = read_utf8(path, "StoryCloze file")
  reader = csv.DictReader(io.StringIO(text))
  missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
  if missing:
    raise InputError(f"{path} lacks the StoryCloze column(s) {', '.join(missing)} "
                     f"(has: {', '.join(reader.fieldnames or [])})")
  stories, skipped = [], 0
  for row in reader:
    fields = [(row.get(c) or "").strip() for c in COLUMNS]
    answer = fields[7]
    if not all(fields[1:7]) or answer not in ("1", "2"):
      skipped += 1
      continue
    endings = (fields[5], fields[6])
    right = endings[int(answer) - 1]
    stories.append(Story(fields[0] or str(len(stories)), " ".join(fields[1:5]), right,
                         endings[2 - int(answer)], tuple(fields[1:7])))
  return stories, {"malformed rows": skipped} if skipped else {}


def read_audio_manifest(path: str, stories: list[Story]
                        ) -> tuple[dict[str, list[str]], dict[str, int]]:
  """Audio of the stories' texts: {text: WAV files, in order}, and what was skipped.

  The manifest is JSON lines `{"story": ID, "part": COLUMN, "audio": WAV}`, COLUMN one of
  InputSentence1..4, RandomFifthSentenceQuiz1, RandomFifthSentenceQuiz2, WAV relative to the
  manifest. A story's spoken context is its four sentences' audio in order.
  """
  p = epath.Path(path)
  if not p.exists():
    raise MissingFileError(f"audio manifest not found: {path}")
  by_story = {s.id: s for s in stories}
  wavs: dict[tuple[str, str], str] = {}
  skipped: dict[str, int] = {}
  for k, line in enumerate(p.read_bytes().decode("utf-8", "replace").splitlines()):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      key, wav = (str(row["story"]), str(row["part"])), str(row["audio"])
    except (json.JSONDecodeError, KeyError, TypeError):
      skipped["malformed audio manifest lines"] = skipped.get("malformed audio manifest lines",
                                                              0) + 1
      continue
    if key[1] not in COLUMNS[1:7]:
      raise InputError(f"{path} line {k + 1}: part {key[1]!r} is not one of "
                       f"{', '.join(COLUMNS[1:7])}")
    wavs[key] = str(p.parent / wav)
  files: dict[str, list[str]] = {}
  for s in by_story.values():
    got = [wavs.get((s.id, c)) for c in COLUMNS[1:7]]
    if all(got[:4]):
      files.setdefault(s.context, got[:4])
    for text, wav in zip(s.parts[4:6], got[4:6]):
      if wav:
        files.setdefault(text, [wav])
  return files, skipped


def t_variant(stories: list[Story], seed: int = 0) -> list[Story]:
  """tStoryCloze: each wrong ending replaced by the right ending of another story."""
  n = len(stories)
  if n < 2:
    raise InputError("tStoryCloze needs at least 2 stories")
  rng = np.random.default_rng(seed)
  other = rng.permutation(n)
  fixed = np.flatnonzero(other == np.arange(n))  # a story drawing itself: shift to the next
  other[fixed] = (fixed + 1) % n
  return [dataclasses.replace(s, wrong=stories[int(j)].right) for s, j in zip(stories, other)]
