"""StoryCloze-style likelihood tasks: the CSV, sStoryCloze and tStoryCloze pairs.

CSV (contracts.md): InputStoryid, InputSentence1..4, RandomFifthSentenceQuiz1,
RandomFifthSentenceQuiz2, AnswerRightEnding (1 or 2). sStoryCloze keeps the story's own wrong
ending; tStoryCloze replaces it by the right ending of another story, drawn with a seeded
permutation (a topic change: the easier task).
"""

import csv
import dataclasses
import io

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


def read_csv(path: str) -> tuple[list[Story], dict[str, int]]:
  """The stories of a StoryCloze CSV and the count of rows skipped (malformed)."""
  p = epath.Path(path)
  if not p.exists():
    raise MissingFileError(f"StoryCloze file not found: {path}")
  try:
    text = p.read_bytes().decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise InputError(f"{path} is not UTF-8 text (byte {e.start})") from None
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
                         endings[2 - int(answer)]))
  return stories, {"malformed rows": skipped} if skipped else {}


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
