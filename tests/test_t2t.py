"""The text-to-token model: units, packing, training (the real entry point), and synthesis:
batched, KV-cached, no recompilation per batch, the same output whatever the batch, sharded
over 8 devices exactly as on 1, bad input counted.

Pairs here come from a known code for each character (two speech codes per letter), so a
round trip (text -> t2t tokens -> that code read back -> text) measures what the model learned.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from sptlm.t2t import input as input_lib
from sptlm.t2t import synthesize as synth_lib
from sptlm.t2t import units as units_lib
from sptlm.train import program as program_lib

from t2t_synthetic import (CONFIG, K, ROOT, _cer, _codes, _read_back, _sentences,
                           data_config)


@pytest.fixture(scope="module")
def trained(trained_t2t) -> pathlib.Path:
  return trained_t2t


def test_units_spell_the_normalized_transcript():
  chars = units_lib.Characters()
  enc = chars.encode("Héllo, World 42!")
  assert enc.text == "h llo world" and chars.decode(enc.ids) == enc.text
  assert enc.dropped == 3  # é, 4, 2


def test_sentencepiece_units_are_trained_once_kept_and_spell_the_text(tmp_path):
  texts = _sentences(300, 3)
  pieces = units_lib.train("sentencepiece:48", texts, str(tmp_path))
  assert isinstance(pieces, units_lib.Pieces) and pieces.size() == 48
  enc = pieces.encode("The big red car, 42!")
  assert enc.text == "the big red car" and pieces.decode(enc.ids) == enc.text
  assert len(enc.ids) < len(enc.text)  # pieces are longer than characters
  stamp = (tmp_path / units_lib.MODEL_FILE).stat().st_mtime_ns
  again = units_lib.train("sentencepiece:48", ["other text entirely"], str(tmp_path))
  assert (tmp_path / units_lib.MODEL_FILE).stat().st_mtime_ns == stamp  # kept, not retrained
  assert again.encode("the big red car").ids == enc.ids
  assert units_lib.load("characters", str(tmp_path)).size() == 28
  with pytest.raises(ValueError, match="sentencepiece:N"):
    units_lib.parse("phonemes")
  with pytest.raises(ValueError, match="missing"):
    units_lib.load("sentencepiece:48", str(tmp_path / "elsewhere"))
  assert enc.dropped == 2  # 4, 2


def test_long_texts_split_at_sentences_then_spaces():
  assert synth_lib.split_text("One two three. Four five six seven eight.", 12) == [
      "one two", "three", "four five", "six seven", "eight"]


def test_packed_rows_weigh_speech_and_end_of_audio_only_and_resume_exactly():
  from data_pipelines.vocabulary import Vocabulary
  chars = units_lib.Characters()
  vocab = Vocabulary(chars.size(), K)
  texts = _sentences(40, 1)
  seqs = [input_lib.example(chars.encode(t).ids, _codes(t), vocab) for t in texts]
  lengths = [len(chars.encode(t).ids) for t in texts]
  it = input_lib.PackedPairs(seqs, lengths, seq_len=96, global_batch=4, seed=3)
  b = next(it)
  weighted = b["targets"][b["weights"] > 0]
  assert vocab.is_speech(weighted).sum() + (weighted == vocab.special_id(
      "<|end_of_audio|>")).sum() == weighted.size
  real = b["segment_ids"] > 0
  assert (b["weights"][~real] == 0).all()
  eoa = vocab.special_id("<|end_of_audio|>")
  for r in range(4):  # per pair: every speech target and its <|end_of_audio|>, nothing else
    for seg in set(b["segment_ids"][r][real[r]].tolist()):
      m = b["segment_ids"][r] == seg
      t, w = b["targets"][r][m], b["weights"][r][m]
      if eoa not in t:  # the row's last pair may lose its final target to the row's end
        continue
      assert ((w > 0) == (vocab.is_speech(t) | (t == eoa))).all()
  state = it.get_state()
  want = [next(it) for _ in range(5)]
  again = input_lib.PackedPairs(seqs, lengths, seq_len=96, global_batch=4, seed=3)
  again.set_state(state)
  for w in want:
    g = next(again)
    assert all((g[k] == w[k]).all() for k in w)


def test_training_lowers_the_loss_and_the_round_trip_beats_an_untrained_model(trained):
  rows = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["loss"] < rows[0]["loss"] - 1.5, (rows[0], rows[-1])
  held_out = _sentences(24, 99)
  t2t = synth_lib.T2T.load(str(trained))
  got = t2t.synthesize(held_out)
  trained_cer = _cer(held_out, [_read_back(c) for c in got])
  ratio = sum(len(c) for c in got) / sum(len(_codes(t)) for t in held_out)
  untrained = synth_lib.T2T(t2t.cfg, jax.tree.map(
      lambda x: np.asarray(x), program_lib.build(t2t.cfg, _one_device_mesh()).init()["params"]),
      t2t.tokenizer)
  untrained_cer = _cer(held_out, [_read_back(c) for c in untrained.synthesize(held_out)])
  assert trained_cer < 0.5 * untrained_cer and trained_cer < 0.5, (trained_cer, untrained_cer)
  assert 0.7 < ratio < 1.3, ratio


def _one_device_mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))


def test_same_output_whatever_the_batch_and_no_recompilation_per_batch(trained):
  from sptlm.model import decode
  t2t = synth_lib.T2T.load(str(trained))
  texts = _sentences(13, 7) + ["a", "the big red car is far from home now"]
  before = decode._generate_jit._cache_size()
  base = t2t.synthesize(texts, seed=5, temperature=0.8, top_p=0.9)
  order = list(reversed(range(len(texts))))
  shuffled = t2t.synthesize([texts[i] for i in order], seed=5, temperature=0.8, top_p=0.9,
                            batch_size=8)
  alone = [t2t.synthesize([t], seed=5, temperature=0.8, top_p=0.9, batch_size=8)[0]
           for t in texts[:4]]
  compiled = decode._generate_jit._cache_size() - before
  assert all(len(b) > 0 for b in base)
  for i, j in enumerate(order):
    assert shuffled[i].shape == base[j].shape and (shuffled[i] == base[j]).all()
  for a, b in zip(alone, base):
    assert a.shape == b.shape and (a == b).all()
  # widths 16 and 48 at batch 8, and 16 and 48 at batch 16: at most one program each
  assert compiled <= 4, compiled
  again = t2t.synthesize(_sentences(30, 8), seed=1)
  assert decode._generate_jit._cache_size() - before <= 5 and len(again) == 30


def test_eight_devices_give_the_one_device_output(trained):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
  texts = _sentences(16, 11)
  one = synth_lib.T2T.load(str(trained)).synthesize(texts, seed=2, temperature=0.7)
  eight = synth_lib.T2T.load(str(trained), mesh=mesh).synthesize(texts, seed=2, temperature=0.7)
  assert all(len(a) > 0 for a in one)
  for a, b in zip(one, eight):
    assert a.shape == b.shape and (a == b).all()
  # continuous batching, 8 slots split over the 8 devices: the same tokens again
  flowing = synth_lib.T2T.load(str(trained), mesh=mesh).synthesize(
      texts + ["a"], seed=2, temperature=0.7, batch_size=8, batching="continuous")
  for a, b in zip(one, flowing):
    assert a.shape == b.shape and (a == b).all()
  assert len(flowing[-1]) > 0


def test_bad_input_is_counted_never_a_crash(trained, tmp_path):
  t2t = synth_lib.T2T.load(str(trained))
  long = " ".join(_sentences(12, 3)) + "."
  out = t2t.synthesize(["", "   ", "1234", long, "the cat"])
  assert [len(o) for o in out[:3]] == [0, 0, 0] and len(out[3]) > 0 and len(out[4]) > 0
  c = t2t.summary.counts
  assert c["empty texts"] == 2 and c["texts without a speakable character"] == 1
  assert c["long texts split"] == 1 and c["characters without a unit (dropped)"] == 4
  f = tmp_path / "in.txt"
  f.write_bytes(b"the cat sat\n\xff\xfe bad bytes\n\nmy hat\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-m", "sptlm.cli", "t2t", "synthesize", "--workdir",
                         str(trained), "--file", str(f)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(x) for x in proc.stdout.splitlines()]
  assert [r["text"] for r in rows] == ["the cat sat", "", "my hat"]
  assert rows[1]["tokens"] == [] and len(rows[0]["tokens"]) > 0
  last = proc.stderr.strip().splitlines()[-1]
  assert "1 empty texts" in last and "1 lines not UTF-8 (skipped)" in last, last


def test_a_tokenizer_other_than_the_trained_one_is_refused(trained):
  class Other:  # what the check reads of a SpeechTokenizer: its codebook
    vq_state = {"codebook": np.ones((K, 4), np.float32)}
    codebook_size = K

  ident = {"path": "runs/speech_a", "fingerprint": "0123456789abcdef", "codebook_size": K}
  with pytest.raises(synth_lib.InputError, match="learned the codes of the speech tokenizer "
                     "runs/speech_a"):
    synth_lib.check_pairing(ident, Other(), str(trained))


def test_the_config_file_loads_and_round_trips():
  from sptlm.t2t import config as config_lib
  cfg = config_lib.load(CONFIG)
  assert cfg.vocab.text_size == units_lib.Characters().size() and cfg.kind == "t2t"
  assert config_lib.from_json(config_lib.to_json(cfg)) == cfg
  with pytest.raises(config_lib.ConfigError, match="data.seq_len=64 must hold the longest pair"):
    config_lib.load(CONFIG, ["--config.data.seq_len=64"])
  with pytest.raises(config_lib.ConfigError, match="data.text_units='phonemes'"):
    config_lib.load(CONFIG, ["--config.data.text_units=phonemes"])
  with pytest.raises(config_lib.ConfigError, match="synth.batching"):
    config_lib.load(CONFIG, ["--config.synth.batching=dynamic"])
  old = json.loads(config_lib.to_json(cfg))  # a config.json written before these keys existed
  del old["data"]["text_units"], old["synth"]["batching"]
  assert config_lib.from_json(json.dumps(old)) == cfg


def test_interleaved_task_speaks_its_spans_with_the_text_to_token_model(trained, tmp_path):
  """The data pipeline's interleaved seqio task on the real t2t model: every speech span reads
  back (through the synthetic language) as the text it replaced."""
  seqio = pytest.importorskip("seqio")
  from data_pipelines import interleave as il
  from data_pipelines import tasks
  from data_pipelines import text_tokenizer as tt
  from data_pipelines.seqio_vocab import SpeechTextVocabulary
  from data_pipelines.vocabulary import Vocabulary
  tok = tt.load(str(ROOT / "data_pipelines" / "assets" / "tiny_sp1024.model"))
  vocab = SpeechTextVocabulary(tok, Vocabulary(1024, K))
  docs = [". ".join(_sentences(6, 500 + i)) + "." for i in range(8)]
  (tmp_path / "docs.txt").write_text("\n\n".join(docs))
  t2t = synth_lib.T2T.load(str(trained))
  inter = il.Interleaver(tok, vocab.layout, t2t.synthesize, seed=0)
  task = tasks.interleaved_task("t2t_interleaved", [str(tmp_path / "docs.txt")], vocab, inter,
                                batch=4)
  rows = list(task.get_dataset({"targets": 2048}, split="train", shuffle=False)
              .as_numpy_iterator())
  seqio.TaskRegistry.remove("t2t_interleaved")
  direct = il.Interleaver(tok, vocab.layout, t2t.synthesize, seed=0)(docs)
  refs, hyps = [], []
  for row, ex in zip(rows, direct):
    assert (row["targets"][:-1] == ex.ids).all()
    for start, end, text in ex.spans:
      refs.append(units_lib.Characters().encode(text).text)
      hyps.append(_read_back(vocab.layout.speech_code(ex.ids[start + 1:end - 1])))
  assert len(rows) == 8 and len(refs) >= 8
  assert _cer(refs, hyps) < 0.5, list(zip(refs, hyps))[:5]


def test_data_inspect_prints_spans_and_interleaving_statistics(trained, tmp_path, capsys):
  pytest.importorskip("seqio")
  from sptlm import cli
  docs = tmp_path / "docs.txt"
  docs.write_text("\n\n".join(". ".join(_sentences(20, 900 + i)) for i in range(30)))
  config = data_config(tmp_path / "data.py", trained, f"""{{
      "plain": dict(kind="text", files=("{docs}",), rate=1.0),
      "mixed": dict(kind="interleaved", files=("{docs}",), rate=3.0)}}""")
  assert cli.main(["data", "inspect", "--config", str(config), "--n", "2"]) == 0
  out = capsys.readouterr().out
  assert "== task mixed (interleaved, rate 3) ==" in out
  assert "== task plain (text, rate 1) ==" in out
  assert out.count("[audio: ") >= 2 and out.count("examples: 30 ") == 2
  # the mixture, drawn through grain: token shares within a point of the rates' 75 / 25
  mixed = out.split("\nmixed ")[1].split("\n")[0]
  assert "target  75.0%" in mixed, mixed
  assert abs(float(mixed.split("measured ")[1].split("%")[0]) - 75.0) < 1.0, mixed
  share = float(out.split("spoken: ")[1].split("%")[0])
  assert 30.0 <= share < 32.0, share  # eta = 0.3 of the LM tokens, rounded up per document
  mean = float(out.split("span length (LM tokens): mean ")[1].split(" ")[0])
  assert 7.0 < mean < 10.5, mean  # lambda 10, less the cut last span of each document
  assert cli.main(["data", "inspect", "--config", str(config),
                   "--config.interleave.eta=1.5"]) == 1
  assert "interleave.eta=1.5 must be in (0, 1)" in capsys.readouterr().err
  assert cli.main(["data", "inspect", "--config", str(config),
                   "--config.vocab.speech_size=32"]) == 1  # not the t2t model's codebook
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "makes 64 speech codes but vocab.speech_size is 32" in err[0], err
