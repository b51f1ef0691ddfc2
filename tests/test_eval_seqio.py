"""The eval tasks as seqio tasks: the metric functions on hand-built cases, the shifted
vocabulary, and seqio.Evaluator runs over a tiny random-weight model whose accuracies equal
`sptlm eval`'s (runner.evaluate) on the same StoryCloze CSV and LLaMA Questions TSV, in T->T
and, with a stand-in voice, in speech settings."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from sptlm.eval import scoring, seqio_tasks, spoken_qa, storycloze

ROOT = pathlib.Path(__file__).resolve().parents[1]
SP = str(ROOT / "data_pipelines" / "assets" / "tiny_sp1024.model")
HEADER = ("InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
          "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n")
NAMES = ["anna", "ben", "cleo", "dev", "eli", "fay", "gus", "hana"]


def test_rank_accuracy_credits_ties_half_as_pair_score_does():
  scores = {0: (-1.0, -2.0), 1: (-1.5, -1.5), 2: (-3.0, -0.5)}  # story: (right, wrong)
  targets, flat = [], []
  for story, (right, wrong) in scores.items():
    targets += [(story, True), (story, False)]
    flat += [right, wrong]
  got = seqio_tasks.rank_accuracy(targets, flat)
  want = [scoring.pair_score(-r, -w) for r, w in scores.values()]
  assert want == [1.0, 0.5, 0.0]
  assert got == {"accuracy": sum(want) / 3, "n": 3, "ties": 1}
  # more than two choices, in any order: a three-way tie at the top is worth a third
  got = seqio_tasks.rank_accuracy([(7, False), (7, True), (7, False), (8, False), (8, True)],
                                  [-1.0, -1.0, -1.0, -0.1, -0.2])
  assert got["accuracy"] == pytest.approx((1 / 3 + 0) / 2) and got["ties"] == 1
  assert np.isnan(seqio_tasks.rank_accuracy([], [])["accuracy"])


def test_qa_accuracy_normalises_articles_punctuation_and_takes_the_first_line():
  cases = [("The Eiffel Tower!", ("eiffel tower",), True),
           ("it is an  Apple.", ("the apple",), True),
           ("pineapple", ("apple",), False),  # whole words only
           ("Paris, France", ("Lyon", "paris"), True),  # any gold answer
           ("", ("x",), False)]
  got = seqio_tasks.qa_accuracy([c[1] for c in cases], [c[0] for c in cases])
  assert got == {"accuracy": 3 / 5, "n": 5}
  assert [spoken_qa.is_correct(p, g) for p, g, _ in cases] == [c[2] for c in cases]
  post = seqio_tasks.postprocess_answer
  assert post("  Paris\nLondon is ") == "Paris"
  assert post("x", example={"answers": np.array([b"Lyon", b"Paris"])}, is_target=True) == (
      "Lyon", "Paris")
  assert seqio_tasks.postprocess_choice(
      "x", example={"idx": np.array([4, 1]), "is_correct": np.False_}, is_target=True) == (4, False)
  assert seqio_tasks.task_name("tstorycloze", "S->T") == "sptlm_eval_tstorycloze_s_t"


def test_importing_the_module_imports_no_tensorflow():
  code = ("import sys; import sptlm.eval.seqio_tasks; "
          "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_shifted_vocabulary_keeps_seqios_padding_id_free():
  pytest.importorskip("seqio")
  from types import SimpleNamespace

  from data_pipelines import text_input
  from data_pipelines.seqio_vocab import SpeechTextVocabulary
  from data_pipelines.vocabulary import Vocabulary
  tok, layout = text_input.load_tokenizer(SP, 1024), Vocabulary(1024, 64)
  vocab = seqio_tasks.vocabulary(SimpleNamespace(tokenizer=tok, vocab=layout))
  inner = SpeechTextVocabulary(tok, layout)
  s = "the cat <|begin_of_audio|><|audio_0|><|audio_63|><|end_of_audio|> sat"
  ids = vocab.encode(s)
  assert ids == [i + 1 for i in inner.encode(s)] and min(ids) >= 1
  assert vocab.decode(ids + [0, 0]) == inner.decode(inner.encode(s))
  assert vocab.eos_id == inner.eos_id + 1 and vocab.vocab_size == layout.size + 1
  assert vocab == seqio_tasks.vocabulary(SimpleNamespace(tokenizer=tok, vocab=layout))
  assert list(vocab.encode_tf(np.array(s.encode())).numpy()) == ids
  rows = np.array([ids + [0], [ids[0]] + [0] * len(ids)], np.int32)
  assert [x.decode() for x in vocab.decode_tf(rows).numpy()] == [vocab.decode(ids),
                                                                 vocab.decode(ids[:1])]


# --- end to end: seqio.Evaluator against `sptlm eval` over one random-weight model ---


class Voice:
  """A stand-in text-to-token model (one code per letter): speech settings' plumbing only."""

  def synthesize(self, texts: list[str]) -> list[np.ndarray]:
    return [np.array([ord(c) - ord("a") for c in t.lower() if "a" <= c <= "z"], np.int32)
            for t in texts]


@pytest.fixture(scope="module")
def lm():
  pytest.importorskip("seqio")
  import jax

  from data_pipelines import text_input
  from sptlm import config as config_lib
  from sptlm.eval.lm import LanguageModel
  from sptlm.train import program
  cfg = config_lib.load(ROOT / "configs" / "tiny.py",
                        ["--config.model.num_layers=2", "--config.data.shards=",
                         "--config.eval.batch=4", "--config.eval.qa_max_new_tokens=8"])
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))
  params = program.build(cfg, mesh).init()["params"]
  # spread the initial weights (and the norms' zero scales) so that greedy answers vary
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + 0.5 * rng.standard_normal(x.shape, np.float32), params)
  return LanguageModel.from_params(cfg, 0, params, text_input.load_tokenizer(SP, 1024))


def _evaluate(lm, name: str, **score_kwargs) -> dict[str, float]:
  import seqio
  evaluator = seqio.Evaluator(name, seqio_tasks.feature_converter(), "validation")
  try:
    metrics, _ = evaluator.evaluate(compute_metrics=True,
                                    score_fn=seqio_tasks.score_fn(lm, **score_kwargs),
                                    predict_fn=seqio_tasks.predict_fn(lm))
    return metrics.result()[name]
  finally:
    # shut its thread pool down here: left to __del__, garbage collection can run it inside a
    # thread another test is starting (grain's prefetch) and deadlock that test (seen in CI)
    evaluator.close()


def _stories(path: pathlib.Path) -> pathlib.Path:
  rows = []
  for i, n in enumerate(NAMES):
    m = NAMES[(i + 3) % len(NAMES)]
    right, wrong = f"{n} drank the tea with {m}.", f"{n} sold the house by the sea."
    endings = f"{wrong},{right},2" if i % 2 else f"{right},{wrong},1"
    rows.append(f"s{i},{n} woke up early.,{n} made some tea.,The tea was too hot.,"
                f"{n} waited for {m}.,{endings}")
  rows.append("bad,A.,B.,C.,,x.,y.,1")
  path.write_text(HEADER + "".join(r + "\n" for r in rows))
  return path


def test_storycloze_through_seqio_equals_sptlm_eval(lm, tmp_path):
  from sptlm.eval import runner
  from sptlm.eval.speaker import Speaker
  csv = str(_stories(tmp_path / "cloze.csv"))
  want = {(r["task"].lower(), r["setting"]): r for r in runner.evaluate(
      str(tmp_path), "storycloze", csv, settings=["T->T"], write=False, lm=lm)}
  names = seqio_tasks.register(lm, "storycloze", csv)
  assert names == ["sptlm_eval_sstorycloze_t_t", "sptlm_eval_tstorycloze_t_t"]
  for name, key in zip(names, [("sstorycloze", "T->T"), ("tstorycloze", "T->T")]):
    got = _evaluate(lm, name)
    assert (got["accuracy"], got["n"], got["ties"]) == (
        want[key]["accuracy"], want[key]["n"], want[key]["ties"]), name
    assert want[key]["n"] == len(NAMES)
  # summed NLLs, and speech contexts and endings from a Speaker (the runner's own scoring)
  summed = runner.evaluate(str(tmp_path), "tstorycloze", csv, settings=["T->T"], reduce="sum",
                           write=False, lm=lm)[0]
  assert _evaluate(lm, names[1], reduce="sum")["accuracy"] == summed["accuracy"]
  speaker = Speaker(lm, t2t=Voice(), source="letters")
  names = seqio_tasks.register(speaker, "sstorycloze", csv, settings=["S->S", "T->S"])
  stories = storycloze.read_csv(csv)[0]
  for name, setting in zip(names, ["S->S", "T->S"]):
    rows, _ = runner.score_stories(lm, speaker, stories, setting, "mean", lm.cfg.eval.batch)
    assert _evaluate(lm, name)["accuracy"] == sum(r["score"] for r in rows) / len(rows), name


def test_spoken_qa_through_seqio_equals_sptlm_eval(lm, tmp_path):
  from sptlm.eval import qa, runner
  from sptlm.eval.speaker import Speaker
  questions = [f"what did {n} drink with {m}" for n, m in zip(NAMES, NAMES[3:] + NAMES[:3])]
  tsv = tmp_path / "q.tsv"
  tsv.write_text("Questions\tAnswer\n" + "".join(f"{q}?\tnothing at all\n" for q in questions))
  # gold answers from the model's own greedy answers for half the questions: a mixed score
  rows, _ = qa.answer(lm, Speaker(lm), spoken_qa.read(str(tsv))[0], "T->T", lm.cfg.eval)
  gold = [r["prediction"].split()[-1] if k % 2 and r["prediction"].split() else "zzz"
          for k, r in enumerate(rows)]
  assert any(g != "zzz" for g in gold), "the model answered nothing"
  tsv.write_text("Questions\tAnswer\n" + "".join(f"{q}?\t{g}\n" for q, g in zip(questions, gold)))
  want = runner.evaluate(str(tmp_path), "spoken_qa", str(tsv), settings=["T->T"], write=False,
                         lm=lm)[0]
  assert 0 < want["accuracy"] < 1
  name, = seqio_tasks.register(lm, "spoken_qa", str(tsv))
  got = _evaluate(lm, name)
  assert name == "sptlm_eval_spoken_qa_t_t"
  assert (got["accuracy"], got["n"]) == (want["accuracy"], want["n"])
  # spoken questions from a Speaker
  speaker = Speaker(lm, t2t=Voice(), source="letters")
  name, = seqio_tasks.register(speaker, "spoken_qa", str(tsv), settings=["S->T"])
  rows, _ = qa.answer(lm, speaker, spoken_qa.read(str(tsv))[0], "S->T", lm.cfg.eval)
  assert _evaluate(lm, name)["accuracy"] == sum(r["score"] for r in rows) / len(rows)


def test_registering_checks_the_task_and_settings(lm, tmp_path):
  from sptlm.errors import InputError
  csv = str(_stories(tmp_path / "cloze.csv"))
  with pytest.raises(InputError, match="need speech"):
    seqio_tasks.register(lm, "tstorycloze", csv, settings=["S->T"])
  with pytest.raises(InputError, match="'T->S' is not one of"):
    seqio_tasks.register(lm, "spoken_qa", csv, settings=["T->S"])
  with pytest.raises(InputError, match="task 'perplexity'"):
    seqio_tasks.register(lm, "perplexity", csv)
  (tmp_path / "bad.csv").write_text(HEADER + "bad,A.,B.,C.,,x.,y.,1\n")
  with pytest.raises(InputError, match="no usable stories"):
    seqio_tasks.register(lm, "sstorycloze", str(tmp_path / "bad.csv"))
