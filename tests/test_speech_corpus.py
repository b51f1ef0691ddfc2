"""build-corpus: real espeak-ng speech, deterministic for a seed, held-out sentences and voices
never used in training; manifests users bring."""

import hashlib
import json
import pathlib
import shutil

import numpy as np
import pytest
import scipy.io.wavfile

from sptlm.speech import corpus
from sptlm.speech import manifest as manifest_lib

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng is not installed (scripts/setup.sh)")

SENTENCES = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak. You are all resolved rather to die than to famish.
We know it. Let us kill him, and we will have corn at our own price.
Is it a verdict? No more talking on it; let it be done: away, away!
One word, good citizens. We are accounted poor citizens, the patricians good.
What authority surfeits on would relieve us. If they would yield us but the superfluity,
while it were wholesome, we might guess they relieved us humanely.
"""


def _digest(out: pathlib.Path) -> dict[str, str]:
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted((out / "wav").iterdir())}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("text") / "plays.txt"
  path.write_text(SENTENCES)
  return path


def test_sentences_skip_speaker_lines_and_odd_text(text):
  sents = corpus.read_sentences(text)
  assert "Before we proceed any further, hear me speak." in sents
  assert not any(s.endswith(":") and len(s.split()) == 1 for s in sents)
  assert all(3 <= len(s.split()) <= 14 for s in sents)
  got = corpus.normalize_text("Is it a verdict? 'Tis done: away!")
  assert got == "is it a verdict tis done away"


def test_build_is_deterministic_with_disjoint_heldout_splits(text, tmp_path):
  kwargs = dict(texts=[text], num_train=4, num_test=3, num_dev=2, heldout_variants=5,
                workers=2, progress=False)
  a = corpus.build_corpus(tmp_path / "a", seed=7, **kwargs)
  b = corpus.build_corpus(tmp_path / "b", seed=7, **kwargs)
  assert a["fingerprint"] == b["fingerprint"]
  assert (tmp_path / "a" / "manifest.jsonl").read_text() == \
      (tmp_path / "b" / "manifest.jsonl").read_text()
  assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # the same bytes
  c = corpus.build_corpus(tmp_path / "c", seed=8, **kwargs)
  assert c["fingerprint"] != a["fingerprint"]
  assert corpus.build_corpus(tmp_path / "a", seed=7, **kwargs) == a  # a finished build is kept
  with pytest.raises(ValueError, match="different corpus"):
    corpus.build_corpus(tmp_path / "a", seed=8, **kwargs)

  rows = [json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
  assert a["counts"] == {"train": 4, "test": 3, "test_voices": 3, "dev": 2}
  by = {s: [r for r in rows if r["split"] == s] for s in corpus.SPLITS}
  assert not {r["text"] for r in by["train"]} & {r["text"] for r in by["test"]}
  assert not {r["text"] for r in by["dev"]} & {r["text"] for r in by["train"] + by["test"]}
  lm_text = (tmp_path / "a" / corpus.LM_TEXT).read_text().splitlines()
  assert {r["text"] for r in by["train"]} <= set(lm_text)  # the LM text: all but held-out
  assert not set(lm_text) & {r["text"] for r in by["test"] + by["dev"]}
  assert a["lm_sentences"] == len(lm_text) > len(by["train"])
  assert {r["text"] for r in by["test"]} == {r["text"] for r in by["test_voices"]}
  heldout = set(a["heldout_voices"])
  assert not heldout & set(a["train_voices"])
  variant = lambda v: v.split("+")[1]  # noqa: E731
  assert not {variant(v) for v in heldout} & {variant(v) for v in a["train_voices"]}
  assert all(r["voice"] in heldout for r in by["test_voices"])
  assert all(r["voice"] in a["train_voices"] for r in by["train"] + by["test"])
  for r in rows:  # real speech: 16 kHz mono, not silent, the length the manifest says
    rate, pcm = scipy.io.wavfile.read(tmp_path / "a" / r["audio"])
    assert rate == 16_000 and pcm.ndim == 1 and pcm.dtype == np.int16
    assert np.abs(pcm).max() > 1000 and len(pcm) / rate == pytest.approx(r["seconds"], abs=1e-3)
    assert 0.5 < r["seconds"] < 15


def test_an_interrupted_build_goes_on_from_the_clips_it_rendered(text, tmp_path, monkeypatch):
  kwargs = dict(texts=[text], num_train=4, num_test=3, num_dev=2, heldout_variants=5,
                workers=1, progress=False, seed=7)
  whole = corpus.build_corpus(tmp_path / "whole", **kwargs)
  real, rendered = corpus.render, []

  def interrupted(plan, path, engine):
    if len(rendered) == 5:
      raise KeyboardInterrupt  # Ctrl-C, or the machine going away
    rendered.append(plan.id)
    return real(plan, path, engine)

  monkeypatch.setattr(corpus, "render", interrupted)
  out, logged = tmp_path / "a", []
  with pytest.raises(KeyboardInterrupt):
    corpus.build_corpus(out, **kwargs, log=logged.append)
  assert logged == [f"build-corpus: interrupted with 5 of 12 clips in {out}; the same command "
                    "goes on from there"]
  assert not (out / "corpus.json").exists() and (out / corpus.BUILDING).exists()
  kept = {p.name: p.stat().st_mtime_ns for p in (out / "wav").glob("*.wav")}
  assert len(kept) == 5
  with pytest.raises(ValueError, match="partial build of a different corpus"):
    corpus.build_corpus(out, **dict(kwargs, seed=8))

  rendered.clear()
  monkeypatch.setattr(corpus, "render", lambda *a: rendered.append(a[0].id) or real(*a))
  logged.clear()
  got = corpus.build_corpus(out, **kwargs, log=logged.append)
  assert len(rendered) == sum(whole["counts"].values()) - 5  # only the missing clips
  assert any("5 of 12 clips already rendered" in line for line in logged)
  assert {p.name: p.stat().st_mtime_ns for p in (out / "wav").glob("*.wav")
          if p.name in kept} == kept
  assert got == whole and not (out / corpus.BUILDING).exists()
  assert (out / "manifest.jsonl").read_text() == (tmp_path / "whole" / "manifest.jsonl").read_text()
  assert _digest(out) == _digest(tmp_path / "whole")


def test_user_manifests_jsonl_and_tsv(tmp_path):
  wav = tmp_path / "x.wav"
  scipy.io.wavfile.write(wav, 8000, np.zeros(8000, np.int16))
  (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "x.wav", "text": "Hello, World!"}) + "\n")
  (tmp_path / "m.tsv").write_text(f"path\ttranscript\n{wav}\tHello there\tdev\n")
  src = manifest_lib.open_source(str(tmp_path / "m.jsonl"), cache_dir=tmp_path, splits=["train"])
  (u,) = src.utterances("train")
  assert u.text == "hello world" and src.load(u).shape == (16_000,)  # resampled to 16 kHz
  src = manifest_lib.open_source(str(tmp_path / "m.tsv"), cache_dir=tmp_path, splits=["dev"])
  assert [u.text for u in src.utterances("dev")] == ["hello there"]
  with pytest.raises(ValueError, match="no utterances in split 'train'"):
    src.utterances("train")
  with pytest.raises(FileNotFoundError, match="build-corpus"):
    manifest_lib.open_source(str(tmp_path / "nope"), cache_dir=tmp_path, splits=["train"])
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    with pytest.raises(ValueError, match="tensorflow-datasets"):
      manifest_lib.open_source("tfds:librispeech", cache_dir=tmp_path, splits=["train"])


def test_a_larger_corpus_reuses_the_clips_of_a_smaller_one(text, tmp_path, monkeypatch):
  kwargs = dict(texts=[text], num_test=3, num_dev=2, heldout_variants=5, workers=1,
                progress=False, seed=7)
  small = tmp_path / "small"
  corpus.build_corpus(small, num_train=3, **kwargs)
  (small / "wav" / "train-000000.wav").write_bytes(b"RIFF broken")  # damaged: rendered again
  real, rendered, logged = corpus.render, [], []
  monkeypatch.setattr(corpus, "render", lambda *a: rendered.append(a[0].id) or real(*a))
  got = corpus.build_corpus(tmp_path / "big", num_train=5, reuse=small, **kwargs,
                            log=logged.append)
  assert sorted(rendered) == ["train-000000", "train-000003", "train-000004"]
  assert logged == [f"build-corpus: reused 10 of 13 clips from {small}"]
  monkeypatch.setattr(corpus, "render", real)
  fresh = corpus.build_corpus(tmp_path / "fresh", num_train=5, **kwargs)
  assert got == fresh  # the same corpus as one rendered whole
  assert (tmp_path / "big" / "manifest.jsonl").read_text() == \
      (tmp_path / "fresh" / "manifest.jsonl").read_text()
  assert _digest(tmp_path / "big") == _digest(tmp_path / "fresh")
  with pytest.raises(FileNotFoundError, match="--reuse .*no manifest.jsonl"):
    corpus.build_corpus(tmp_path / "other", num_train=5, reuse=tmp_path / "nope", **kwargs)
  assert not (tmp_path / "other").exists()  # refused before anything was written
