"""`sptlm eval`: scoring on hand-built cases, the StoryCloze CSV and its variants, the Wilson
interval on known counts, batched NLLs equal to one unpadded forward pass, and an end-to-end
run on a tiny trained checkpoint in every setting (speech from the tiny t2t model)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sptlm import cli
from sptlm.errors import InputError, MissingFileError
from sptlm.eval import scoring, storycloze
from t2t_synthetic import K, ROOT, _sentences

HEADER = ("InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
          "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n")


def test_pair_scores_ties_and_mean_against_sum():
  assert scoring.pair_score(1.0, 2.0) == 1.0 and scoring.pair_score(2.0, 1.0) == 0.0
  assert scoring.pair_score(1.5, 1.5) == 0.5
  right, wrong = [1.0, 1.0], [1.5]  # longer right ending: cheaper per token, dearer in sum
  assert scoring.pair_score(scoring.continuation_nll(right), scoring.continuation_nll(wrong)) == 1
  assert scoring.pair_score(scoring.continuation_nll(right, "sum"),
                            scoring.continuation_nll(wrong, "sum")) == 0
  with pytest.raises(ValueError):
    scoring.continuation_nll([1.0], "max")


def test_wilson_interval_on_known_counts():
  lo, hi = scoring.wilson(50, 100)
  assert abs(lo - 0.4038) < 1e-4 and abs(hi - 0.5962) < 1e-4
  lo, hi = scoring.wilson(0, 10)
  assert lo == 0.0 and abs(hi - 0.2775) < 1e-4
  lo, hi = scoring.wilson(9.5, 10)  # ties count half
  assert abs(lo - 0.6555) < 1e-4 and abs(hi - 0.9948) < 1e-4
  assert scoring.wilson(0, 0) == (0.0, 1.0)


def _csv(path: pathlib.Path, rows: list[str]) -> pathlib.Path:
  path.write_text(HEADER + "".join(r + "\n" for r in rows))
  return path


def test_storycloze_csv_and_its_t_variant(tmp_path):
  rows = [f"s{i},A{i}.,B{i}.,C{i}.,D{i}.,right {i}.,wrong {i}.,1" for i in range(5)]
  rows.append("s5,A.,B.,C.,D.,wrong five.,right five.,2")
  rows += ["bad,A.,B.,C.,,x.,y.,1", "bad2,A.,B.,C.,D.,x.,y.,3"]
  stories, skipped = storycloze.read_csv(str(_csv(tmp_path / "s.csv", rows)))
  assert len(stories) == 6 and skipped == {"malformed rows": 2}
  assert stories[5].right == "right five." and stories[5].wrong == "wrong five."
  assert stories[0].context == "A0. B0. C0. D0."
  t = storycloze.t_variant(stories, seed=3)
  assert [s.right for s in t] == [s.right for s in stories]
  assert all(s.wrong != s.right and s.wrong in {x.right for x in stories} for s in t)
  assert t == storycloze.t_variant(stories, seed=3)
  (tmp_path / "x.csv").write_text("a,b\n1,2\n")
  with pytest.raises(InputError, match="lacks the StoryCloze column"):
    storycloze.read_csv(str(tmp_path / "x.csv"))
  with pytest.raises(MissingFileError):
    storycloze.read_csv(str(tmp_path / "none.csv"))


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> pathlib.Path:
  """A tiny LM trained briefly on the text corpus with the synthetic language's K codes, so
  the tiny t2t model (K codes) can speak for it."""
  root = tmp_path_factory.mktemp("lm")
  wd = root / "run"
  stories = _csv(root / "stories.csv", [f"s{i},A{i} came.,B{i} went.,C{i} sat.,D{i} ran.,"
                                        f"It ended {i}.,It went on {i}.,1" for i in range(6)])
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-m", "sptlm.cli", "train", "--config",
                         str(ROOT / "configs" / "tiny.py"), "--workdir", str(wd),
                         "--config.data.shards=", f"--config.vocab.speech_size={K}",
                         "--config.model.num_layers=2", "--config.train.steps=20",
                         "--config.train.log_every=10", "--config.mesh.data=1",
                         "--config.eval.every=10", "--config.eval.limit=4",
                         f"--config.eval.tasks=(('tstorycloze', '{stories}'),)"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return wd


def test_periodic_evaluation_during_training(lm_run):
  rows = [json.loads(x) for x in (lm_run / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval_tStoryCloze_T_to_T" in r]
  assert [r["step"] for r in evals] == [10, 20]
  assert all(0.0 <= r["eval_tStoryCloze_T_to_T"] <= 1.0 for r in evals)
  res = json.loads((lm_run / "eval" / "step_20" / "tstorycloze.json").read_text())
  assert res[0]["n"] == 4 and res[0]["checkpoint_step"] == 20


def test_batched_nlls_equal_one_unpadded_forward_pass(lm_run):
  from sptlm.eval.lm import LanguageModel
  lm = LanguageModel.load(str(lm_run))
  pairs = [(lm.tokenizer.encode("First Citizen: we are accounted poor"),
            lm.tokenizer.encode("citizens, the patricians good.")),
           (lm.tokenizer.encode("Speak, speak."), lm.tokenizer.encode("You are all resolved."))]
  got = lm.continuation_nlls(pairs, batch=4)
  for (ctx, cont), nll in zip(pairs, got):
    seq = jnp.asarray([ctx + cont])
    logp = jax.nn.log_softmax(lm.model(seq[:, :-1]).astype(jnp.float32), -1)[0]
    want = -np.asarray([logp[len(ctx) - 1 + j, cont[j]] for j in range(len(cont))])
    np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5)


def test_eval_end_to_end_in_every_setting(lm_run, trained_t2t, tmp_path, capsys):
  docs = [". ".join(_sentences(5, 40 + i)) + "." for i in range(12)]
  parts = [d.split(". ") for d in docs]
  rows = [f"st{i},{','.join(p[:4])},{p[4]},{parts[(i + 1) % 12][4]},1"
          for i, p in enumerate(parts)]
  data = _csv(tmp_path / "stories.csv", rows)
  out = tmp_path / "res.json"
  assert cli.main(["eval", "--workdir", str(lm_run), "--task", "storycloze", "--data",
                   str(data), "--t2t", str(trained_t2t), "--limit", "10", "--out",
                   str(out)]) == 0
  results = json.loads(out.read_text())
  assert [(r["task"], r["setting"]) for r in results] == [
      (t, s) for t in ("sStoryCloze", "tStoryCloze") for s in ("S->S", "S->T", "T->S", "T->T")]
  for r in results:
    assert r["n"] == 10 and 0.0 <= r["accuracy"] <= 1.0 and r["ci_method"] == "wilson"
    assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
    assert (r["speech_source"] is None) == (r["setting"] == "T->T")
  examples = [json.loads(x) for x in out.with_name("res.examples.jsonl").read_text().splitlines()]
  assert len(examples) == 80 and {"nll_right", "nll_wrong", "score"} <= set(examples[0])
  assert any((lm_run / "tensorboard" / "eval").iterdir())
  printed = capsys.readouterr().out
  assert "tStoryCloze  T->T  n=10" in printed
  again = tmp_path / "again.json"  # deterministic
  assert cli.main(["eval", "--workdir", str(lm_run), "--task", "tstorycloze", "--data",
                   str(data), "--setting", "T->T", "--limit", "10", "--out", str(again)]) == 0
  assert json.loads(again.read_text())[0]["accuracy"] == results[-1]["accuracy"]
  capsys.readouterr()
  assert cli.main(["eval", "--workdir", str(lm_run), "--task", "storycloze", "--data",
                   str(data)]) == 1
  assert "need --t2t DIR" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", str(lm_run), "--task", "nope", "--data",
                   str(data), "--setting", "T->T"]) == 1
  assert "is not one of" in capsys.readouterr().err


def test_perplexity_of_text_and_speech(lm_run, trained_t2t, tmp_path):
  from sptlm.eval.lm import LanguageModel
  docs = [". ".join(_sentences(3, 70 + i)) + "." for i in range(4)]
  long_doc = " ".join(docs * 12)  # longer than the model's 128 tokens: several windows
  (tmp_path / "docs.txt").write_text("\n\n".join(docs + [long_doc, "   "]))
  out = tmp_path / "ppl.json"
  assert cli.main(["eval", "--workdir", str(lm_run), "--task", "perplexity", "--data",
                   str(tmp_path / "docs.txt"), "--t2t", str(trained_t2t), "--out",
                   str(out)]) == 0
  text, speech = json.loads(out.read_text())
  assert (text["setting"], speech["setting"]) == ("T", "S") and text["n"] == speech["n"] == 5
  assert speech["speech_source"].startswith("t2t:") and text["speech_source"] is None
  lm = LanguageModel.load(str(lm_run))  # the text figure, by hand: one pass per window
  total, tokens = 0.0, 0
  for d in docs + [long_doc]:
    ids = lm.tokenizer.encode(d)
    for start in range(0, len(ids) - 1, 128):
      piece = ids[start:start + 129]
      logp = jax.nn.log_softmax(lm.model(jnp.asarray([piece[:-1]])).astype(jnp.float32), -1)[0]
      total -= float(sum(logp[j, piece[j + 1]] for j in range(len(piece) - 1)))
      tokens += len(piece) - 1
  assert text["tokens"] == tokens
  np.testing.assert_allclose(text["perplexity"], np.exp(total / tokens), rtol=1e-4)
  # a text-only model has never seen speech ids: finite, and far worse than on text
  assert np.isfinite(speech["perplexity"]) and speech["perplexity"] > text["perplexity"]
  assert speech["tokens"] > 0


def test_answer_normalisation_and_matching():
  from sptlm.eval import spoken_qa
  assert spoken_qa.normalize("The  Beatles, of course!") == "beatles of course"
  assert spoken_qa.normalize("An apple a day") == "apple day"
  assert spoken_qa.is_correct("It was the Jamaican English, I think.", ("Jamaican English",))
  assert spoken_qa.is_correct("the U.S.A.", ("u s a",))
  assert not spoken_qa.is_correct("Parisian", ("Paris",))  # whole words only
  assert not spoken_qa.is_correct("", ("Paris",))
  assert not spoken_qa.is_correct("anything", ("the",))  # an answer that normalises away


def test_spoken_qa_files_in_every_format(tmp_path):
  from sptlm.eval import spoken_qa
  (tmp_path / "wavs").mkdir()
  tsv = tmp_path / "llama.tsv"
  tsv.write_text("Questions\tAnswer\tWav Filename\nwho wrote hamlet?\tShakespeare\twavs/0.wav\n"
                 "what is two plus two?\t\twavs/1.wav\n\tx\twavs/2.wav\nwhere?\tthere\t\n")
  qs, skipped = spoken_qa.read(str(tsv))
  assert [q.text for q in qs] == ["who wrote hamlet?"] and qs[0].answers == ("Shakespeare",)
  assert qs[0].audio == str(tmp_path / "wavs" / "0.wav")
  assert skipped == {"empty answer lists": 1, "empty questions": 1,
                     "rows without a Wav Filename": 1}
  plain = tmp_path / "plain.tsv"
  plain.write_text("Questions\tAnswer\nwho wrote hamlet?\tShakespeare\n")
  qs, skipped = spoken_qa.read(str(plain))
  assert qs[0].audio is None and skipped == {}
  webq = tmp_path / "webq.json"
  webq.write_text(json.dumps([{"qId": "a", "qText": "what does jamaican people speak?",
                               "answers": ["Jamaican Creole English Language",
                                           "Jamaican English"]},
                              {"qText": "no answers?", "answers": []},
                              {"qText": 3, "answers": ["x"]}]))
  qs, skipped = spoken_qa.read(str(webq))
  assert [(q.id, len(q.answers)) for q in qs] == [("a", 2)]
  assert skipped == {"empty answer lists": 1, "malformed rows": 1}
  real, _ = spoken_qa.read(str(ROOT.parent / "shared" / "data" / "webquestions_test.json")) \
      if (ROOT.parent / "shared" / "data" / "webquestions_test.json").exists() else ([1], {})
  assert len(real) > 0
  (tmp_path / "bad.tsv").write_text("Q\tA\nx\ty\n")
  with pytest.raises(InputError, match="lacks the LLaMA Questions header"):
    spoken_qa.read(str(tmp_path / "bad.tsv"))
  (tmp_path / "latin1.tsv").write_bytes("Questions\tAnswer\ncaf\xe9\tx\n".encode("latin-1"))
  with pytest.raises(InputError, match="not UTF-8"):
    spoken_qa.read(str(tmp_path / "latin1.tsv"))
  with pytest.raises(MissingFileError):
    spoken_qa.read(str(tmp_path / "none.tsv"))


def test_prompt_templates_place_special_tokens_and_the_question(lm_run):
  from sptlm.eval import prompts
  from sptlm.eval.lm import LanguageModel
  lm = LanguageModel.load(str(lm_run))
  tok, vocab = lm.tokenizer, lm.vocab
  q = [vocab.special_id("<|begin_of_audio|>"), vocab.speech_start + 5,
       vocab.special_id("<|end_of_audio|>")]
  ids = prompts.render("<|user|>{question}<|assistant|>", q, tok, vocab)
  assert ids == [vocab.special_id("<|user|>"), *q, vocab.special_id("<|assistant|>")]
  ids = prompts.render("Question: {question} Answer:", tok.encode("who"), tok, vocab)
  assert ids == tok.encode("Question: ") + tok.encode("who") + tok.encode(" Answer:")
  with pytest.raises(InputError, match="unknown special token '<\\|nope\\|>'"):
    prompts.render("<|nope|>{question}", [], tok, vocab)


def test_spoken_qa_end_to_end_text_and_spoken_questions(lm_run, trained_t2t, tmp_path, capsys):
  questions = [" ".join(_sentences(1, 90 + i)) for i in range(6)]
  tsv = tmp_path / "q.tsv"
  tsv.write_text("Questions\tAnswer\n" + "".join(f"{q}?\tnothing like it\n" for q in questions))
  out = tmp_path / "qa.json"
  assert cli.main(["eval", "--workdir", str(lm_run), "--task", "spoken_qa", "--data", str(tsv),
                   "--t2t", str(trained_t2t), "--setting", "S->T,T->T", "--out", str(out),
                   "--batch", "4", "--config.eval.qa_max_new_tokens=8"]) == 0
  results = json.loads(out.read_text())
  assert [(r["task"], r["setting"], r["n"]) for r in results] == [
      ("LLaMA-Questions", "S->T", 6), ("LLaMA-Questions", "T->T", 6)]
  assert results[0]["speech_source"].startswith("t2t:") and results[1]["speech_source"] is None
  rows = [json.loads(x) for x in out.with_name("qa.examples.jsonl").read_text().splitlines()]
  assert {"prompt_tokens", "prediction", "gold", "score"} <= set(rows[0])
  assert all(r["generated_tokens"] <= 8 for r in rows)
  # gold answers taken from the model's own greedy answers: those rows must now score 1
  words = {r["question"]: r["prediction"].split()[-1] for r in rows
           if r["setting"] == "T->T" and r["prediction"].split()}
  assert words, "the model answered nothing in T->T"
  tsv.write_text("Questions\tAnswer\n" + "".join(f"{q}?\t{words.get(q + '?', 'zzz')}\n"
                                                 for q in questions))
  again = tmp_path / "again.json"
  assert cli.main(["eval", "--workdir", str(lm_run), "--task", "spoken_qa", "--data", str(tsv),
                   "--setting", "T->T", "--out", str(again), "--batch", "4",
                   "--config.eval.qa_max_new_tokens=8"]) == 0
  got = json.loads(again.read_text())[0]
  assert got["accuracy"] == pytest.approx(len(words) / 6)
  capsys.readouterr()
  assert cli.main(["eval", "--workdir", str(lm_run), "--task", "spoken_qa", "--data", str(tsv),
                   "--setting", "T->S"]) == 1
  assert "give --speech-tokenizer DIR" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", str(lm_run), "--task", "spoken_qa", "--data", str(tsv),
                   "--setting", "T->T", "--config.train.steps=3"]) == 1
  assert "only --config.eval.KEY overrides" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", str(lm_run), "--task", "spoken_qa", "--data", str(tsv),
                   "--setting", "T->T", "--batch", "3", "--mesh"]) == 1
  assert "multiple of the" in capsys.readouterr().err


def test_sharded_scoring_and_generation_equal_one_device_on_the_9b_config():
  """configs/glm4_9b.py at a reduced shape over 8 devices (fsdp x tensor): the parameters keep
  the training's sharding, rows are split over the batch axes, figures equal one device's."""
  from sptlm import config as config_lib
  from sptlm import sharding
  from sptlm.eval.lm import LanguageModel
  from sptlm.train import program as program_lib
  from data_pipelines import text_input
  cfg = config_lib.load(ROOT / "configs" / "glm4_9b.py", [
      "--config.model.num_layers=2", "--config.model.d_model=64", "--config.model.num_heads=4",
      "--config.model.head_dim=16", "--config.model.d_ff=128", "--config.model.dtype=float32",
      "--config.model.attention_chunk=0", "--config.model.loss_chunk=0",
      "--config.vocab.text_size=1024", "--config.vocab.speech_size=512",
      "--config.vocab.text_tokenizer=data_pipelines/assets/tiny_sp1024.model",
      "--config.data.seq_len=64", "--config.data.global_batch_size=8",
      "--config.data.num_shards=1", "--config.mesh.tensor=2"])
  mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                             "tensor": cfg.mesh.tensor})
  assert mesh.devices.size == 8
  params = program_lib.build(cfg, mesh).init()["params"]
  tok = text_input.load_tokenizer(str(ROOT / cfg.vocab.text_tokenizer), cfg.vocab.text_size)
  sharded = LanguageModel.from_params(cfg, 0, params, tok, mesh)
  one = LanguageModel.from_params(cfg, 0, jax.device_get(params), tok)
  assert sharded.data_parallel == 4
  embed = [x for x in jax.tree.leaves(nnx_state(sharded.model)) if x.ndim == 2][0]
  assert len(embed.sharding.device_set) == 8 and not embed.sharding.is_fully_replicated
  rng = np.random.default_rng(0)
  pairs = [(rng.integers(0, 1500, 5 + i).tolist(), rng.integers(0, 1500, 3 + i).tolist())
           for i in range(10)]
  for a, b in zip(sharded.continuation_nlls(pairs, batch=8), one.continuation_nlls(pairs, batch=8)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  prompts = [p for p, _ in pairs]
  assert sharded.generate(prompts, 6, [], batch=8) == one.generate(prompts, 6, [], batch=8)


def nnx_state(model):
  from flax import nnx
  return nnx.state(model, nnx.Param)
