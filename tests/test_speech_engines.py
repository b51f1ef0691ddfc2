"""Several TTS engines for the tokenizer's corpus (issue 16): each installed engine renders
real 16 kHz speech whose settings change it, build-corpus records engine and voice per clip,
holds one engine out of training, skips a missing engine with one line and a failed clip by
count; and the token agreement behind `sptlm tokenizer evaluate`."""

import json
import pathlib

import numpy as np
import pytest

from sptlm.errors import InputError
from sptlm.speech import corpus, engines, robust_eval
from sptlm.speech import manifest as manifest_lib
from sptlm.speech.features import SAMPLE_RATE

SENTENCES = ["The cat sat on the mat.", "A dog ran in the park today.",
             "We will go home now.", "She sells sea shells by the shore.",
             "The sun is hot this morning.", "He reads a good book at night.",
             "They play in the snow all day.", "The bird sings a happy song.",
             "My hat is red and blue.", "You can see the sea from here."]
SENTENCE = "What is the name of the river that runs through the city?"


def _installed(name: str) -> engines.Engine:
  engine = engines.get(name)
  why = engine.missing()
  if why:
    pytest.skip(why)
  return engine


@pytest.mark.parametrize("name", [e for e in engines.ENGINES if e != "espeak"])
def test_each_engine_renders_speech_that_its_settings_change(name):
  engine = _installed(name)
  assert engine.voices()
  voices = engine.voices()
  if name == "kokoro":  # 15 voices at ~1 s a render: one speaker and one blend
    voices = [voices[0], voices[-1]]
  for voice in voices:
    slow = engine.render(SENTENCE, voice, engines.Settings(85, 100, 100) if name != "mbrola"
                         else engines.Settings(130, 50, 100))
    fast = engine.render(SENTENCE, voice, engines.Settings(120, 100, 100) if name != "mbrola"
                         else engines.Settings(200, 50, 100))
    for x in (slow, fast):
      assert x.dtype == np.float32 and x.ndim == 1
      assert 1.0 < len(x) / SAMPLE_RATE < 15.0, (voice, len(x))
      assert np.sqrt(np.mean(x ** 2)) > 0.005  # speech, not silence
      assert np.abs(x).max() <= 1.0
    if not voice.endswith("_hts"):  # Festival's HTS voice has a fixed rate (recorded 100)
      assert len(slow) > 1.1 * len(fast), (voice, len(slow), len(fast))
  loud = engine.render(SENTENCE, engine.voices()[0], engine.draw(np.random.default_rng(0),
                                                                 engine.voices()[0]))
  assert len(loud) > SAMPLE_RATE


def test_draw_is_deterministic_and_inside_the_ranges():
  for name in engines.ENGINES:
    engine = engines.get(name)
    draws = [engine.draw(np.random.default_rng([3, i]), "v") for i in range(50)]
    again = [engine.draw(np.random.default_rng([3, i]), "v") for i in range(50)]
    assert draws == again
    for key, (lo, hi) in engine.ranges.items():
      assert all(lo <= getattr(d, key) <= hi for d in draws)
  hts = engines.get("festival").draw(np.random.default_rng(0), "cmu_us_slt_arctic_hts")
  assert (hts.rate, hts.pitch) == (100, 100)
  assert {engines.get("kokoro").draw(np.random.default_rng([1, i]), "v").pitch
          for i in range(20)} == {100}  # Kokoro has no pitch control


def test_kokoro_reads_english_phonemes_in_its_own_symbols_and_blends_voices():
  kokoro = _installed("kokoro")
  _, vocab, styles = kokoro._load()
  for sentence in SENTENCES + [SENTENCE, "Why did you choose the joy of a cheap tour?"]:
    phonemes = kokoro.phonemes(sentence)
    assert "^" not in phonemes and "ː" not in phonemes
    kept = [c for c in phonemes if c in vocab]
    assert len(kept) >= 0.97 * len(phonemes), (sentence, set(phonemes) - set(vocab))
  assert kokoro.phonemes("Why choose joy today?").count("I") == 1  # "why": a^ɪ -> I
  base = [v for v in kokoro.voices() if "+" not in v]
  assert len(base) == 5 and len(kokoro.voices()) == 5 + 10
  settings = engines.Settings(100, 100, 100)
  a, b = (kokoro.render(SENTENCE, v, settings) for v in base[:2])
  blend = kokoro.render(SENTENCE, f"{base[0]}+{base[1]}", settings)
  assert np.array_equal(a, kokoro.render(SENTENCE, base[0], settings))  # deterministic
  assert not np.array_equal(blend[:len(a)], a[:len(blend)]) and len(blend) > SAMPLE_RATE
  with pytest.raises(engines.EngineError, match="no voice 'nobody'"):
    kokoro.render(SENTENCE, "nobody", settings)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("text") / "sentences.txt"
  path.write_text("\n\n".join(SENTENCES) + "\n")
  return path


def _build(out, text, **kw):
  kw.setdefault("engines", ("espeak", "flite", "piper"))
  kw.setdefault("heldout_engine", "piper")
  return corpus.build_corpus(out, texts=[text], seed=2, num_train=5, num_test=2, num_dev=1,
                             heldout_variants=4, progress=False, **kw)


def test_a_multi_engine_corpus_records_engines_and_holds_one_out(tmp_path, text):
  for name in ("flite", "piper"):
    _installed(name)
  log = []
  meta = _build(tmp_path / "c", text, log=log.append)
  assert log == []
  rows = [json.loads(x) for x in (tmp_path / "c" / "manifest.jsonl").read_text().splitlines()]
  assert meta["engines"]["flite"] == list(engines.FLITE_VOICES)
  assert meta["heldout_engine"] == "piper" and meta["failed"] == 0
  by_split = {}
  for r in rows:
    by_split.setdefault(r["split"], []).append(r)
    assert r["voice"] and r["engine"] in ("espeak", "flite", "piper")
    assert (tmp_path / "c" / r["audio"]).stat().st_size > 1000
  assert "piper" not in {r["engine"] for s in ("train", "dev") for r in by_split[s]}
  assert {r["engine"] for r in by_split["test_engine"]} == {"piper"}
  # every held-out sentence is said by every engine: test has espeak and flite, test_engine
  # piper, all on the same two sentences
  test_texts = {r["text"] for r in by_split["test"]}
  assert len(test_texts) == 2
  assert sorted((r["text"], r["engine"]) for r in by_split["test"]) == sorted(
      (t, e) for t in test_texts for e in ("espeak", "flite"))
  assert {r["text"] for r in by_split["test_engine"]} == test_texts
  assert {r["text"] for r in by_split["test_voices"]} == test_texts
  train_texts = {r["text"] for r in by_split["train"]}
  assert not train_texts & test_texts
  lm = (tmp_path / "c" / corpus.LM_TEXT).read_text().splitlines()
  assert not set(lm) & test_texts
  # reading it back keeps the engine
  source = manifest_lib.ManifestSource(tmp_path / "c")
  assert {u.engine for u in source.utterances("test_engine")} == {"piper"}
  # the same command is the same corpus; another held-out engine is another corpus
  assert _build(tmp_path / "c", text)["fingerprint"] == meta["fingerprint"]
  with pytest.raises(InputError, match="holds a different corpus"):
    _build(tmp_path / "c", text, heldout_engine="flite")


def test_espeak_only_plans_hash_as_before_engines_existed(text):
  plans = corpus.plan_corpus(corpus.read_sentences(text), seed=2, num_train=5, num_test=2,
                             heldout_variants=4)
  assert all(p.engine == "espeak" and "engine" not in p.record() for p in plans)
  other = corpus.Plan("x", "s", "train", "slt", 100, 100, 100, "flite")
  assert other.record()["engine"] == "flite"


def test_a_missing_engine_is_skipped_with_one_line(tmp_path, text, monkeypatch):
  monkeypatch.setattr(engines.Flite, "missing", lambda self: "flite is not installed (test)")
  log = []
  meta = _build(tmp_path / "c", text, engines=("espeak", "flite"), heldout_engine="",
                log=log.append)
  assert log == ["build-corpus: skipping engine flite: flite is not installed (test)"]
  assert list(meta["engines"]) == ["espeak"] and meta["skipped_engines"] == {
      "flite": "flite is not installed (test)"}
  with pytest.raises(InputError, match="unknown TTS engine 'sapi'"):
    _build(tmp_path / "d", text, engines=("espeak", "sapi"), heldout_engine="")
  with pytest.raises(InputError, match="--heldout-engine piper is not one of"):
    _build(tmp_path / "e", text, engines=("espeak",), heldout_engine="piper")


def test_a_failed_clip_is_skipped_and_counted(tmp_path, text, monkeypatch):
  real = engines.Espeak.render

  def flaky(self, sentence, voice, s):
    if sentence.startswith("My hat"):
      raise engines.EngineError("espeak-ng (test) failed: boom")
    return real(self, sentence, voice, s)

  monkeypatch.setattr(engines.Espeak, "render", flaky)
  log = []
  sentences = corpus.read_sentences(text)
  plans = corpus.plan_corpus(sentences, seed=2, num_train=8, num_test=1, heldout_variants=4)
  hit = [p.id for p in plans if p.sentence.startswith("My hat")]
  meta = corpus.build_corpus(tmp_path / "c", texts=[text], seed=2, num_train=8, num_test=1,
                             heldout_variants=4, progress=False, log=log.append)
  assert meta["failed"] == len(hit) >= 1
  assert log[0].startswith(f"build-corpus: skipped {hit[0]}: espeak-ng (test) failed")
  ids = [json.loads(x)["id"] for x in (tmp_path / "c" / "manifest.jsonl").read_text()
         .splitlines()]
  assert len(ids) == len(plans) - len(hit) and not set(hit) & set(ids)


def test_token_agreement_counts_equal_tokens_on_the_alignment():
  assert robust_eval.align_matches([1, 2, 3, 4], [1, 2, 3, 4]) == 4
  assert robust_eval.align_matches([1, 2, 3, 4], [9, 1, 2, 3, 4]) == 4  # one insertion
  assert robust_eval.align_matches([1, 2, 3, 4], [1, 7, 3, 4]) == 3  # one substitution
  assert robust_eval.align_matches([1, 2], [3, 4, 5]) == 0
  assert robust_eval.align_matches([], [1]) == 0
  # ties between equal-cost alignments go to the one with more matches
  assert robust_eval.align_matches([1, 2], [2, 1]) == 1
  pairs = [(np.array([1, 2, 3, 4]), np.array([1, 2, 3, 4])),
           (np.array([1, 2]), np.array([3, 4, 5, 6]))]
  assert robust_eval.agreement(pairs) == pytest.approx(4 / 8)


def test_conditions_are_deterministic_and_do_what_they_say():
  rng = np.random.default_rng(0)
  t = np.arange(SAMPLE_RATE * 2) / SAMPLE_RATE
  x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 6000 * t)).astype(
      np.float32)
  assert robust_eval.condition(x, "clean", rng) is x
  a = robust_eval.condition(x, "noisy", np.random.default_rng(1))
  b = robust_eval.condition(x, "noisy", np.random.default_rng(1))
  np.testing.assert_array_equal(a, b)
  snr = 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((a - x).astype(np.float64) ** 2))
  assert abs(snr - robust_eval.NOISY_SNR_DB) < 0.2
  tel = robust_eval.condition(x, "telephone", rng)
  spec = np.abs(np.fft.rfft(tel)) ** 2
  freqs = np.fft.rfftfreq(len(tel), 1 / SAMPLE_RATE)
  assert spec[freqs > 4000].sum() < 0.01 * spec.sum()  # the 6 kHz tone is gone
  with pytest.raises(ValueError, match="unknown condition"):
    robust_eval.condition(x, "underwater", rng)


def test_wordnet_text_for_the_lm(tmp_path):
  """fetch-lm-text --source wordnet: definitions and quoted examples become sentences; the
  license header is not text; a missing install is one line naming the package."""
  from sptlm.errors import MissingFileError
  from sptlm.speech import lm_text
  root = tmp_path / "wordnet"
  root.mkdir()
  header = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
  (root / "data.noun").write_text(
      header + '03151077 06 n 01 cup 0 003 @ 03147509 n 0000 | a small open container usually '
      'used for drinking; usually has a handle; "he put the cup back in the saucer"\n')
  (root / "data.verb").write_text(
      header + '01170052 34 v 01 drink 0 001 @ 01166351 v 0000 | take in liquids; "The patient '
      'must drink several liters each day"\n')
  (root / "data.adj").write_text(header)
  (root / "data.adv").write_text(header)
  assert lm_text.wordnet_sentences(root) == [
      "A small open container usually used for drinking.", "Usually has a handle.",
      "He put the cup back in the saucer.", "Take in liquids.",
      "The patient must drink several liters each day."]
  out = lm_text.write_wordnet(tmp_path / "out", root)
  read = lm_text.read([out], heldout=["take in liquids"])
  assert read.sentences[0] == "a small open container usually used for drinking"
  assert read.dropped_sentences == 1 and len(read.sentences) == 4
  (root / "data.adv").unlink()
  with pytest.raises(MissingFileError, match="apt-get install wordnet-base"):
    lm_text.wordnet_sentences(root)
  if lm_text.WORDNET_DIR.is_dir():  # the real Debian package
    real = lm_text.wordnet_sentences()
    assert len(real) > 150_000 and "The children were playing house." in real
