"""CTC beam search with a word n-gram LM: Kneser-Ney distributions sum to 1 and match a direct
recursive estimate, ARPA files round-trip exactly and bad ones are named, the search spells
known words right where greedy decoding misspells them, and without an LM it is greedy."""

import math
import pathlib
import time

import numpy as np
import pytest
import sentencepiece as spm

from sptlm.speech import ngram_lm
from sptlm.speech.ctc_decode import beam_search, decode_batch
from sptlm.speech.ngram_lm import EOS, UNK, NgramLM
from sptlm.speech.units import Units, train_units

SENTENCES = [
    "you must to pomfret not unto the tower", "some men make the tower their home",
    "see what it means to them", "you must see some men", "the tower means some thing",
    "make it so", "you see it now", "come home now", "some say it means nothing",
    "what men make men mend", "the king's men came home", "i see what you mean",
] * 2 + ["a b c d e", "b c d", "a a a b", "e d c b a a"]


@pytest.fixture(scope="module")
def lm() -> NgramLM:
  return NgramLM.train(SENTENCES, order=3)


@pytest.fixture(scope="module")
def char_model(tmp_path_factory) -> pathlib.Path:
  """A SentencePiece `char` model: '▁' and single letters (and <unk>)."""
  d = tmp_path_factory.mktemp("char_units")
  (d / "t.txt").write_text("\n".join(SENTENCES) + "\n")
  spm.SentencePieceTrainer.train(
      input=str(d / "t.txt"), model_prefix=str(d / "c"), vocab_size=60, model_type="char",
      character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, num_threads=1,
      minloglevel=2, hard_vocab_limit=False)
  return d / "c.model"


@pytest.fixture(scope="module")
def chars(char_model) -> Units:
  u = Units(char_model)
  assert all(len(u.sp.id_to_piece(i)) == 1 for i in range(1, u.size))
  return u


@pytest.fixture(scope="module")
def subwords(tmp_path_factory) -> Units:
  u = Units(train_units(SENTENCES * 5, 40, tmp_path_factory.mktemp("sw") / "u.model", "unigram"))
  assert any(len(u.sp.id_to_piece(i)) > 2 for i in range(u.size))  # multi-letter pieces
  return u


def posteriors(frames: list[dict[int, float]], classes: int, floor: float = 1e-4) -> np.ndarray:
  """Log-softmax [T, C] from per-frame {class: probability} (the rest share `floor`)."""
  p = np.full((len(frames), classes), floor)
  for t, f in enumerate(frames):
    for c, v in f.items():
      p[t, c] = v
  p /= p.sum(axis=1, keepdims=True)
  return np.log(p).astype(np.float32)


def spelled(units: Units, text: str, skip: dict[int, float] | None = None) -> np.ndarray:
  """Peaky posteriors for `text` (label, blank per label); label i in `skip` gets only that
  much probability, inside a blank frame (so greedy decoding drops it)."""
  frames = []
  for i, c in enumerate(units.labels(text).tolist()):
    if skip and i in skip:
      frames.append({0: 1.0 - skip[i], c: skip[i]})
    else:
      frames += [{c: 0.9}, {0: 0.9}]
  return posteriors(frames, units.size + 1)


# ---- The language model ---------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_context_is_a_distribution(order):
  lm = NgramLM.train(SENTENCES, order=order)
  words = sorted(lm.vocab) + [EOS, UNK]
  contexts = {g[:-1] for g in lm._prob if len(g) > 1} | {(), ("nowhere",), ("the", "nowhere")}
  contexts |= {("<s>", "you"), ("men", "make"), ("<s>",)}
  assert len(contexts) > (20 if order > 1 else 5)
  for ctx in contexts:
    total = math.fsum(math.exp(lm.logprob(w, ctx)) for w in words)
    assert abs(total - 1.0) < 1e-6, (ctx, total)
  assert lm.logprob("zebra", ("the",)) == lm.logprob(UNK, ("the",)) < lm.logprob("tower", ())


def _reference_kn(sentences: list[str], order: int):
  """Interpolated modified Kneser-Ney computed directly by recursion over the counts."""
  from collections import Counter
  counts = [Counter() for _ in range(order)]
  for s in sentences:
    toks = ("<s>", *s.split(), "</s>")
    for n in range(1, order + 1):
      for i in range(len(toks) - n + 1):
        counts[n - 1][toks[i:i + n]] += 1
  adj = [dict(c) for c in counts]
  for n in range(1, order):
    for g in adj[n - 1]:
      if g[0] != "<s>":
        adj[n - 1][g] = len({h for h in counts[n] if h[1:] == g})
  del adj[0][("<s>",)]
  disc = [ngram_lm._discounts(a.values()) for a in adj]
  vocab = len(adj[0]) + 1

  def p(w: str, ctx: tuple[str, ...]) -> float:
    n = len(ctx) + 1
    below = 1.0 / vocab if n == 1 else p(w, ctx[1:])
    rows = {g: a for g, a in adj[n - 1].items() if g[:-1] == ctx}
    if not rows:
      return below
    denom = sum(rows.values())
    d = disc[n - 1]
    gamma = sum(d[min(a, 3) - 1] for a in rows.values()) / denom
    a = rows.get(ctx + (w,), 0)
    return max(a - d[min(a, 3) - 1], 0.0) / denom + gamma * below if a else gamma * below

  return p


def test_backoff_form_equals_the_interpolated_estimate(lm):
  ref = _reference_kn(SENTENCES, 3)
  for ctx in [("<s>",), ("<s>", "you"), ("you", "must"), ("men",), ("tower", "their"),
              ("nowhere", "men"), ("a", "a")]:
    for w in ["see", "make", "tower", "</s>", "a", "home", "b"]:
      assert lm.logprob(w, ctx) == pytest.approx(math.log(ref(w, ctx[-2:])), abs=1e-9), (ctx, w)


def test_arpa_round_trip_is_exact(lm, tmp_path):
  for name in ("lm.arpa", "lm.arpa.gz"):
    path = tmp_path / name
    lm.save_arpa(path)
    back = NgramLM.load_arpa(path)
    assert back.order == 3 and back.vocab == lm.vocab and back.num_ngrams() == lm.num_ngrams()
    for s in SENTENCES + ["zebra men make", "the the the", "i mean nothing new"]:
      assert back.sentence_logprob(s) == pytest.approx(lm.sentence_logprob(s), abs=1e-9)
    assert back.unk_logprob == pytest.approx(lm.unk_logprob, abs=1e-12)
  text = (tmp_path / "lm.arpa").read_text()
  assert text.startswith("\\data\\\nngram 1=") and text.rstrip().endswith("\\end\\")
  assert "\t<unk>" in text and "\n\\3-grams:\n" in text


def test_arpa_without_backoffs_or_unk_loads(tmp_path):
  path = tmp_path / "bigram.arpa"
  path.write_text("written by hand\n\n\\data\\\nngram 1=4\nngram 2=2\n\n\\1-grams:\n"
                  "-1.0 <s> -0.5\n-0.5 </s>\n-0.30103 a\n-1.0 b -0.2\n\n"
                  "\\2-grams:\n-0.1 <s> a\n-0.2 a b\n\n\\end\\\n")
  lm = NgramLM.load_arpa(path)
  assert lm.vocab == {"a", "b"} and lm.order == 2
  assert lm.logprob("a", ("<s>",)) == pytest.approx(-0.1 * math.log(10))
  assert lm.logprob("b", ("a",)) == pytest.approx(-0.2 * math.log(10))
  assert lm.logprob("a", ("b",)) == pytest.approx((-0.2 - 0.30103) * math.log(10))
  assert lm.logprob("zzz") == pytest.approx(-100 * math.log(10))  # KenLM's default for <unk>


@pytest.mark.parametrize("body,line,what", [
    ("\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0 a\n-x b\n\n\\end\\\n", 6, "not a number"),
    ("\\data\\\nngram 1=3\n\n\\1-grams:\n-1.0 a\n-1.0 b\n\n\\end\\\n", 6, "says 3 1-grams"),
    ("\\data\\\nngram 1=1\nngram 2=1\n\n\\1-grams:\n-1.0 a\n\n\\3-grams:\n-1 a a a\n", 8,
     "expected \\\\2-grams:"),
    ("\\data\\\nngram 1=1\n\n\\1-grams:\n-1.0 a b c\n\n\\end\\\n", 5, "1 words"),
    ("\\data\\\nngram 1=1\n\n\\1-grams:\n-1.0 a\n", 5, "expected \\\\end\\\\"),
    ("hello\nworld\n", 2, "no \\\\data\\\\"),
    ("\\data\\\nngram two=1\n", 2, "bad count line"),
    ("\\data\\\nngram 1=1\n\n\\1-grams:\n0.5 a\n\n\\end\\\n", 5, "<= 0"),
])
def test_malformed_arpa_names_file_and_line(tmp_path, body, line, what):
  path = tmp_path / "bad.arpa"
  path.write_text(body)
  with pytest.raises(ValueError, match=rf"bad\.arpa:{line}: .*{what}"):
    NgramLM.load_arpa(path)


def test_training_needs_words():
  with pytest.raises(ValueError, match="no words"):
    NgramLM.train(["", "  "])


# ---- Beam search ----------------------------------------------------------------------------


def test_lm_spells_a_word_greedy_misspells(chars, lm):
  # "▁ s o m e ▁ m e n": the 'e' of "some" has only 0.3 of one blank frame
  lp = spelled(chars, "some men", skip={4: 0.3})
  assert chars.greedy(lp.argmax(axis=1)) == "som men"
  assert beam_search(lp, chars, None, beam=16) == "som men"  # acoustics alone agree
  assert beam_search(lp, chars, lm, beam=16) == "some men"
  assert beam_search(lp, chars, lm, beam=16, lexicon=False) == "some men"  # "som" is <unk>
  lp = spelled(chars, "make it so", skip={4: 0.2})  # "mak it so"
  assert chars.greedy(lp.argmax(axis=1)) == "mak it so"
  assert beam_search(lp, chars, lm, beam=16) == "make it so"


def test_lm_picks_the_likelier_word_sequence(chars, lm):
  # "men" vs "mean": the 'a' is a coin flip acoustically; "some men" is what the text says
  labels = chars.labels("see some mean").tolist()
  frames = []
  for i, c in enumerate(labels):
    frames += [{c: 0.5, 0: 0.5}] if i == 12 else [{c: 0.9}, {0: 0.9}]
  lp = posteriors(frames, chars.size + 1)
  assert beam_search(lp, chars, lm, beam=16, alpha=1.0) == "see some men"


def test_lexicon_only_outputs_known_words(chars, lm):
  rng = np.random.default_rng(0)
  unknown = 0
  for trial in range(20):
    logits = rng.normal(size=(60, chars.size + 1)) * 3.0
    logits[:, 0] += 2.0
    lp = (logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float32)
    out = beam_search(lp, chars, lm, beam=8)
    assert set(out.split()) <= lm.vocab, out
    free = beam_search(lp, chars, lm, beam=8, lexicon=False)
    assert free == " ".join(free.split())  # normalized text either way
    unknown += bool(set(free.split()) - lm.vocab)
  assert unknown > 0  # without the lexicon, noise does spell unknown words


def test_beam_one_without_lm_is_greedy(chars, subwords):
  rng = np.random.default_rng(1)
  for units in (chars, subwords):
    c = units.size + 1
    for trial in range(30):
      t = int(rng.integers(1, 80))
      best = rng.integers(0, c, t)
      best[rng.random(t) < 0.4] = 0  # blanks
      rep = np.flatnonzero(rng.random(t - 1) < 0.2) + 1
      best[rep] = best[rep - 1]  # repeats (merged unless a blank separates them)
      logits = rng.normal(size=(t, c))
      logits[np.arange(t), best] += 10.0  # peaky: the best class has > 0.9 of the mass
      lp = (logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float32)
      assert np.exp(lp.max(axis=1)).min() > 0.9
      assert beam_search(lp, units, None, beam=1) == units.greedy(lp.argmax(axis=1))
      if trial < 5:  # a wide beam agrees on such clear posteriors too
        assert beam_search(lp, units, None, beam=8) == units.greedy(lp.argmax(axis=1))


def test_repeated_letters_need_a_blank(chars, lm):
  labels = chars.labels("see it").tolist()  # ▁ s e e ▁ i t
  frames = [{c: 0.95} for c in labels[:3]] + [{labels[3]: 0.95}] + [
      {c: 0.95} for c in labels[4:]]  # e e without a blank: one 'e'
  lp = posteriors(frames, chars.size + 1)
  assert beam_search(lp, chars, None, beam=8) == "se it" == chars.greedy(lp.argmax(axis=1))
  frames.insert(3, {0: 0.95})
  lp = posteriors(frames, chars.size + 1)
  assert beam_search(lp, chars, None, beam=8) == "see it"
  assert beam_search(lp, chars, lm, beam=8) == "see it"


def test_subword_pieces(subwords, lm):
  lp = spelled(subwords, "some men make the tower")
  pieces = [subwords.sp.id_to_piece(int(i) - 1) for i in subwords.labels("some men")]
  assert any(len(p) > 2 for p in pieces)  # e.g. '▁some' in one piece
  assert beam_search(lp, subwords, lm, beam=16) == "some men make the tower"
  assert beam_search(lp, subwords, None, beam=16) == "some men make the tower"


def test_empty_input_and_shapes(chars, lm):
  empty = np.zeros((0, chars.size + 1), np.float32)
  assert beam_search(empty, chars, lm) == "" == beam_search(empty, chars, None)
  assert decode_batch([empty, spelled(chars, "make it so")], chars, lm) == ["", "make it so"]
  blanks = posteriors([{0: 0.99}] * 10, chars.size + 1)
  assert beam_search(blanks, chars, lm) == "" == beam_search(blanks, chars, None)
  with pytest.raises(ValueError, match="T, C"):
    beam_search(np.zeros(5, np.float32), chars, lm)
  lp = spelled(chars, "come home now")
  wide = np.concatenate([lp, np.full((len(lp), 7), -30.0, np.float32)], axis=1)
  assert beam_search(wide, chars, lm) == "come home now"  # head wider than the unit model


def test_speed_is_interactive(chars, lm):
  """150 frames (3 s at 50 CTC frames/s) of noisy posteriors at beam 16: well under 50 ms."""
  rng = np.random.default_rng(0)
  text = "you must see some men make the tower"
  frames = []
  for c in chars.labels(text).tolist():
    frames += [{c: 0.6, int(rng.integers(1, chars.size + 1)): 0.2}, {0: 0.7, c: 0.2}, {0: 0.8}]
  frames += [{0: 0.9}] * (150 - len(frames))
  lp = posteriors(frames, chars.size + 1) + rng.normal(size=(150, chars.size + 1)) * 0.7
  lp = (lp - np.log(np.exp(lp).sum(axis=1, keepdims=True))).astype(np.float32)
  assert beam_search(lp, chars, lm, beam=16) == text
  best = min(_timed(lambda: beam_search(lp, chars, lm, beam=16)) for _ in range(5))
  assert best < 0.15, f"{best * 1000:.1f} ms"  # generous: shared CI machines


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


class _NoData:
  """Stands in for the data iterator a training checkpoint stores."""

  def get_state(self) -> bytes:
    return b"{}"

  def set_state(self, state: bytes) -> None:
    pass

  def start_prefetch(self) -> None:
    pass


def test_tokenizer_loads_the_lm_and_decodes_with_it(tmp_path, char_model, chars, lm):
  """SpeechTokenizer: load() finds WORKDIR/asr_lm.arpa; decode() is greedy without an LM (or
  with beam 1) and beam search with one, both from the same stitched CTC frames."""
  import jax

  from sptlm.speech import config as config_lib
  from sptlm.speech import program, tokenizer
  from sptlm.train import checkpoint as checkpoint_lib
  cfg = config_lib.load(pathlib.Path(__file__).parents[1] / "configs" / "speech_tokenizer_tiny.py",
                        ["--config.model.d_model=32", "--config.model.num_heads=2",
                         "--config.model.d_ff=64", "--config.model.layers_before_vq=1",
                         "--config.model.layers_after_vq=1", "--config.model.token_rate_layers=0",
                         "--config.vq.codebook_size=16",
                         f"--config.asr.units={chars.size}"])
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text(config_lib.to_json(cfg))
  (wd / tokenizer.UNITS_FILE).write_bytes(char_model.read_bytes())
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))
  ckpt = checkpoint_lib.Checkpointer(str(wd), keep=1, async_save=False)
  ckpt.save(1, program.build(cfg, mesh, cfg.asr.units).init(), _NoData(),
            config_lib.to_json(cfg))
  ckpt.close()

  greedy = tokenizer.SpeechTokenizer.load(wd)
  assert greedy.lm is None
  lm.save_arpa(wd / tokenizer.LM_FILE)
  beam = tokenizer.SpeechTokenizer.load(wd, beam=4)
  assert beam.lm is not None and beam.lm.vocab == lm.vocab and beam.beam == 4
  assert beam.lm.sentence_logprob("some men") == pytest.approx(lm.sentence_logprob("some men"))
  assert tokenizer.SpeechTokenizer.load(wd, lm=None).lm is None
  one = tokenizer.SpeechTokenizer.load(wd, beam=1)

  rng = np.random.default_rng(0)
  codes = [rng.integers(0, 16, n).astype(np.int32) for n in (7, 0, 40)]
  lps = greedy.log_probs(codes)
  up, c = cfg.model.ctc_upsample, chars.size + 1
  assert [lp.shape for lp in lps] == [(7 * up, c), (0, c), (40 * up, c)]
  np.testing.assert_allclose(np.exp(lps[0]).sum(axis=1), 1.0, rtol=1e-5)
  assert greedy.decode(codes) == one.decode(codes) == [
      chars.greedy(lp.argmax(axis=1)) for lp in lps]
  texts = beam.decode(codes)
  assert texts == decode_batch(lps, chars, lm, beam=4, alpha=0.7, beta=1.0)
  assert texts[1] == "" and all(set(t.split()) <= lm.vocab for t in texts)
  with pytest.raises(ValueError, match="outside the codebook"):
    beam.decode([np.array([16], np.int32)])

  (wd / tokenizer.LM_FILE).write_text("\\data\\\nngram 1=1\n")
  with pytest.raises(ValueError, match=r"asr_lm\.arpa:2: "):
    tokenizer.SpeechTokenizer.load(wd)
