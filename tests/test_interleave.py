"""Interleaving: span statistics match lambda and eta, spans speak exactly their text, the same
document gives the same example in any company or order, bad documents are counted."""

import json
import pathlib

import numpy as np
import pytest

from data_pipelines import interleave as il
from data_pipelines import text_tokenizer as tt
from data_pipelines.vocabulary import Vocabulary

ROOT = pathlib.Path(__file__).resolve().parents[1]
SP = str(ROOT / "data_pipelines" / "assets" / "tiny_sp1024.model")
K = 64


def _speak(texts: list[str]) -> list[np.ndarray]:
  """A stand-in voice: one code per letter, so the test can read back what was spoken."""
  return [np.array([ord(c) - ord("a") for c in t.lower() if "a" <= c <= "z"], np.int32)
          for t in texts]


def _heard(codes: np.ndarray) -> str:
  return "".join(chr(int(c) + ord("a")) for c in codes)


def _documents(n: int) -> list[str]:
  lines = (ROOT / "data_pipelines" / "assets" / "tinyshakespeare.txt").read_text().split("\n\n")
  return [d.strip() for d in lines if len(d.strip()) > 200][:n]


def test_span_lengths_are_poisson_lambda_and_cover_eta():
  lengths, starts_first_half = [], 0
  for d in range(400):
    rng = il.document_rng(f"document {d}", seed=3)
    n = 4000
    spans = il.choose_spans(n, rng, lam=10.0, eta=0.3)
    assert sum(b - a for a, b in spans) == 1200  # ceil(eta x n) exactly
    assert all(a < b for a, b in spans)
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))
    assert spans[0][0] >= 0 and spans[-1][1] <= n
    lengths += [b - a for a, b in spans]
    starts_first_half += sum(a < n // 2 for a, _ in spans)
  lengths = np.array(lengths)  # ~48k spans: the mean's standard error is ~0.015
  assert abs(lengths.mean() - 10.0) < 0.1, lengths.mean()  # (the cut last spans: -0.04)
  assert abs(lengths.var() - 10.0) < 0.5, lengths.var()  # Poisson: variance = mean
  assert abs(starts_first_half / len(lengths) - 0.5) < 0.01  # placed uniformly
  # other lambda and eta
  spans = il.choose_spans(10_000, il.document_rng("x", 0), lam=4.0, eta=0.2)
  assert sum(b - a for a, b in spans) == 2000
  assert abs(np.mean([b - a for a, b in spans]) - 4.0) < 0.25
  assert il.choose_spans(0, il.document_rng("", 0)) == []
  assert il.choose_spans(1, il.document_rng("a", 0)) == [(0, 1)]


def test_each_span_speaks_exactly_its_text_between_audio_markers():
  tok = tt.load(SP)
  vocab = Vocabulary(1024, K)
  inter = il.Interleaver(tok, vocab, _speak, seed=0)
  docs = _documents(20)
  examples = inter(docs)
  boa, eoa = vocab.special_id("<|begin_of_audio|>"), vocab.special_id("<|end_of_audio|>")
  shares = []
  for doc, ex in zip(docs, examples):
    assert ex is not None and ex.spans
    ids = ex.ids
    for start, end, text in ex.spans:
      assert ids[start] == boa and ids[end - 1] == eoa
      assert text and text in doc  # the span's exact characters
      heard = _heard(vocab.speech_code(ids[start + 1:end - 1]))
      assert heard == "".join(c for c in text.lower() if "a" <= c <= "z")
    # outside the spans, only text ids; removing the spans' speech leaves the text tokens
    speech = vocab.is_speech(ids)
    assert not (vocab.is_speech(ids) & ~np.isin(np.arange(len(ids)), np.concatenate(
        [np.arange(s, e) for s, e, _ in ex.spans]))).any()
    assert sum(ex.span_tokens) == int(np.ceil(0.3 * ex.text_tokens))
    shares.append(speech.sum() / len(ids))
  assert inter.counts["documents"] == 20
  assert 0.2 < np.mean(shares) < 0.8


def test_same_document_same_example_in_any_order_or_company():
  tok = tt.load(SP)
  vocab = Vocabulary(1024, K)
  docs = _documents(12)
  one = il.Interleaver(tok, vocab, _speak, seed=7)(docs)
  rev = il.Interleaver(tok, vocab, _speak, seed=7)(docs[::-1])[::-1]
  alone = [il.Interleaver(tok, vocab, _speak, seed=7)([d])[0] for d in docs[:3]]
  for a, b in zip(one, rev):
    assert (a.ids == b.ids).all() and a.spans == b.spans
  for a, b in zip(one, alone):
    assert (a.ids == b.ids).all()
  other_seed = il.Interleaver(tok, vocab, _speak, seed=8)(docs[:1])[0]
  assert other_seed.spans != one[0].spans


def test_bad_documents_are_counted_never_a_crash():
  tok = tt.load(SP)
  vocab = Vocabulary(1024, K)
  inter = il.Interleaver(tok, vocab, _speak, seed=0, max_chars=500)
  out = inter(["", "   \n ", b"\xff\xfe not utf-8", "1234 5678 90", "word " * 1000,
               "fine text here for once"])
  assert out[0] is None and out[1] is None and out[2] is None
  assert out[3] is not None  # digits: its span has nothing speakable, so it stays text
  assert out[4] is not None and out[4].text_tokens < 1000
  assert out[5] is not None
  assert inter.counts["empty documents"] == 2
  assert inter.counts["non-UTF-8 documents"] == 1
  assert inter.counts["documents cut to 500 characters"] == 1
  assert inter.counts["spans kept as text (no speech)"] >= 1


def _hf_tokenizer(folder: pathlib.Path) -> pathlib.Path:
  """A byte-level BPE tokenizer (the kind GLM-4, Llama 3 and Qwen2 ship), trained here."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_documents(200), trainer=trainer)
  folder.mkdir()
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  return folder


def test_hugging_face_and_sentencepiece_tokenizers_load_and_map_spans_to_text(tmp_path):
  hf = tt.load(str(_hf_tokenizer(tmp_path / "hf")))
  sp = tt.load(SP)
  assert isinstance(hf, tt.HuggingFaceTokenizer) and hf.size() == 400
  assert hf.eos_id() == 0 and sp.size() == 1024
  text = "Héllo wörld, what light through yonder window breaks?"
  for tok in (hf, sp):
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) and len(ids) == len(offsets)
    assert all(0 <= a <= b <= len(text) for a, b in offsets)
    assert text[offsets[0][0]:offsets[-1][1]].strip() == text.strip()
  # interleaving with a Hugging Face tokenizer: spans are still exact text
  ex = il.Interleaver(hf, Vocabulary(hf.size(), K), _speak)(_documents(3))
  assert all(e is not None and e.spans for e in ex)


def test_a_tokenizer_that_does_not_fit_the_vocabulary_is_refused(tmp_path):
  sp = tt.load(SP)
  tt.check_size(sp, 1024)
  tt.check_size(sp, 1024 + 512)  # padding rows are fine
  with pytest.raises(ValueError, match="has 1,024 ids but vocab.text_size is 151,552"):
    tt.check_size(sp, 151_552)  # configs/glm4_9b.py with the shipped tokenizer
  with pytest.raises(ValueError, match="vocab.text_size is 1,000"):
    tt.check_size(sp, 1000)
  with pytest.raises(FileNotFoundError, match="text tokenizer not found"):
    tt.load(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tt.load(str(tmp_path / "empty"))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
    tt.load(str(tmp_path / "bad"))
