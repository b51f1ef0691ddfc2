"""`sptlm tokenizer train / encode / transcribe` end to end on a tiny espeak-ng corpus: the loss
falls, an interrupted run resumes with identical losses, and batch jobs survive bad inputs."""

import json
import pathlib
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import scipy.io.wavfile
import scipy.signal

from sptlm.speech import ctc_decode

from speech_cli_helpers import CONFIG, ROOT, SENTENCES, TINY, entry_point, metrics  # noqa: E402
from speech_cli_helpers import corpus_dir, env, run, start, trained  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng is not installed (scripts/setup.sh)")


def test_training_lowers_the_loss(trained, corpus_dir):
  rows = metrics(trained)
  assert [r["step"] for r in rows] == list(range(1, 41))
  first = np.mean([r["loss_ctc"] for r in rows[:3]])
  last = np.mean([r["loss_ctc"] for r in rows[-3:]])
  assert last < first - 1.0, (first, last)
  for key in ("loss", "loss_commit", "grad_norm", "lr", "code_usage", "code_perplexity",
              "tokens_per_s"):
    assert np.isfinite(rows[-1][key]), key
  assert rows[0]["codes_restarted"] > 0  # step 0 seeds the codebook from data
  assert (trained / "checkpoints" / "40").is_dir() and (trained / "asr_units.model").is_file()
  assert json.loads((trained / "config.json").read_text())["kind"] == "speech_tokenizer"
  # the transcription LM: no word only held-out sentences have; weights chosen on `dev`
  lm = ctc_decode.NgramLM.load_arpa(trained / "asr_lm.arpa")
  rows = [json.loads(line) for line in (corpus_dir / "manifest.jsonl").read_text().splitlines()]
  train_words = {w for r in rows if r["split"] == "train" for w in r["text"].split()}
  held_words = {w for r in rows if r["split"] != "train" for w in r["text"].split()}
  assert train_words <= set(lm.vocab) and held_words - train_words
  assert not (held_words - train_words) & set(lm.vocab)
  assert {"quokka", "wombat"} <= set(lm.vocab)
  tuned = json.loads((trained / "asr_decoding.json").read_text())
  assert tuned["split"] == "dev" and 0.0 <= tuned["wer"] <= 1.0 and tuned["alpha"] > 0
  assert tuned["beam"] == 64 and tuned["grid_beam"] == 16  # finalists checked at the run's beam


@pytest.mark.slow  # the loop is sptlm.train.loop's, covered by tests/test_train.py in the default run
def test_sigterm_then_restart_gives_identical_losses(tmp_path, corpus_dir, env):
  args = ["train", "--config", CONFIG, f"--config.data.corpus={corpus_dir}",
          "--config.train.steps=14", *TINY]
  run([*args, "--workdir", str(tmp_path / "straight")], env)
  straight = metrics(tmp_path / "straight")

  workdir = tmp_path / "preempted"
  proc = start([*args, "--workdir", str(workdir)], env)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    path = workdir / "metrics.jsonl"
    if path.exists() and len(path.read_text().splitlines()) >= 4:
      break
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM received" in out + err
  saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved and max(saved) < 14
  run([*args, "--workdir", str(workdir)], env)
  resumed = metrics(workdir)
  assert [r["step"] for r in resumed] == list(range(1, 15))
  assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
  assert [r["code_perplexity"] for r in resumed] == [r["code_perplexity"] for r in straight]


def test_bad_config_key_is_a_one_line_error(corpus_dir, env, tmp_path):
  _, err = run(["train", "--config", CONFIG, "--workdir", str(tmp_path),
                 "--config.vq.codebok_size=3"], env, code=1)
  assert err.strip().splitlines()[-1].startswith("sptlm tokenizer: error:")
  assert "vq.codebok_size" in err and "Traceback" not in err


def _wav(path: pathlib.Path, x: np.ndarray, rate: int = 16_000) -> str:
  scipy.io.wavfile.write(path, rate, x)
  return str(path)


def test_encode_and_transcribe_batch_jobs_survive_bad_inputs(trained, corpus_dir, env, tmp_path):
  speech = sorted((corpus_dir / "wav").iterdir())[0]
  rate, pcm = scipy.io.wavfile.read(speech)
  files = [
      str(speech),
      _wav(tmp_path / "silent.wav", np.zeros(16_000, np.int16)),
      _wav(tmp_path / "short.wav", pcm[:800]),  # 50 ms
      _wav(tmp_path / "stereo.wav", np.stack([pcm, pcm], 1)),
      str(tmp_path / "missing.wav"),
      str(tmp_path / "notes.wav"),
      _wav(tmp_path / "44k.wav", scipy.signal.resample_poly(pcm, 441, 160).astype(np.int16),
           44_100),
      _wav(tmp_path / "long.wav", np.tile(pcm, 20)),  # chunked: above model.max_seconds
  ]
  (tmp_path / "notes.wav").write_text("hello")
  out_file = tmp_path / "tokens.jsonl"
  _, err = run(["encode", "--workdir", str(trained), "--output", str(out_file), *files], env,
                code=1)
  rows = [json.loads(line) for line in out_file.read_text().splitlines()]
  assert [r["audio"] for r in rows] == files  # every input, in order
  errors = {pathlib.Path(r["audio"]).name: r["error"] for r in rows if "error" in r}
  assert set(errors) == {"short.wav", "stereo.wav", "missing.wav", "notes.wav"}
  assert "too short" in errors["short.wav"] and "2 channels" in errors["stereo.wav"]
  assert "not a WAV" in errors["notes.wav"] and "no such file" in errors["missing.wav"]
  assert "4 of 8 inputs failed" in err and "Traceback" not in err
  ok = {pathlib.Path(r["audio"]).name: r for r in rows if "error" not in r}
  n = len(pcm)
  assert len(ok[speech.name]["tokens"]) == -(-n // 1280)  # 12.5 tokens per second
  assert abs(len(ok["44k.wav"]["tokens"]) - len(ok[speech.name]["tokens"])) <= 1  # resampled
  assert len(ok["long.wav"]["tokens"]) == -(-20 * n // 1280)
  assert "silent" in ok["silent.wav"]["warning"]

  # Resume: a killed job left a torn line; lines written stay, finished inputs are skipped.
  kept = out_file.read_text().splitlines()[:2]
  out_file.write_text("\n".join(kept) + "\n" + '{"audio": "torn')
  _, err = run(["encode", "--workdir", str(trained), "--output", str(out_file),
                 "--mix-channels", *files], env, code=1)
  lines = out_file.read_text().splitlines()
  assert lines[:2] == kept
  again = [json.loads(line)["audio"] for line in lines[2:]]
  assert str(speech) not in again and files[1] not in again  # done before: skipped
  assert files[3] in again  # stereo now mixed to mono
  assert "3 of 6 inputs failed" in err

  text_file = tmp_path / "text.jsonl"
  run(["transcribe", "--workdir", str(trained), "--tokens", str(out_file), "--output",
        str(text_file)], env, code=1)  # the error lines of the token file stay errors
  texts = [json.loads(line) for line in text_file.read_text().splitlines()]
  assert [t["index"] for t in texts] == list(range(len(lines)))
  assert all(isinstance(t.get("text", t.get("error")), str) for t in texts)
  out, _ = run(["transcribe", "--workdir", str(trained), str(speech)], env)
  (row,) = [json.loads(line) for line in out.splitlines()]
  assert row["audio"] == str(speech) and isinstance(row["text"], str)
  out, _ = run(["transcribe", "--workdir", str(trained), str(speech), "--beam", "1"], env)
  (greedy_row,) = [json.loads(line) for line in out.splitlines()]
  from sptlm.speech import audio as audio_lib
  from sptlm.speech.tokenizer import SpeechTokenizer
  samples = audio_lib.read(str(speech)).samples
  assert row["text"] == SpeechTokenizer.load(trained).transcribe([samples])[0]  # LM beam search
  assert greedy_row["text"] == SpeechTokenizer.load(trained, lm=None).transcribe([samples])[0]
  _, err = run(["encode", "--workdir", str(tmp_path / "nowhere"), str(speech)], env, code=1)
  assert "not a tokenizer work directory" in err.strip().splitlines()[-1]


def _digest(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


def test_a_changed_model_stops_before_anything_is_touched(trained, corpus_dir, env, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  before = _digest(workdir)
  _, err = run(["train", "--config", CONFIG, "--workdir", str(workdir),
                 f"--config.data.corpus={corpus_dir}", "--config.train.steps=40", *TINY,
                 "--config.model.d_model=48"], env, code=1)
  line = err.strip().splitlines()[-1]
  assert line.startswith("sptlm tokenizer: error: checkpoint ") and "Traceback" not in err
  assert "params/" in line and "in the config but" in line and "model.d_model: 32 -> 48" in line
  assert _digest(workdir) == before


@pytest.mark.slow  # the checkpointer is the LM's, covered by tests/test_train.py by default
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(corpus_dir, env, tmp_path):
  args = ["train", "--config", CONFIG, f"--config.data.corpus={corpus_dir}",
          "--config.train.steps=6", *TINY, "--config.train.checkpoint_every=3"]
  run([*args, "--workdir", str(tmp_path / "run")], env)
  before = metrics(tmp_path / "run")
  newest = tmp_path / "run" / "checkpoints" / "6"
  victim = max((p for p in (newest / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim.unlink()
  _, err = run([*args, "--workdir", str(tmp_path / "run")], env)
  assert "is damaged" in err and "resuming from checkpoint at step 3" in err
  assert (tmp_path / "run" / "corrupt_checkpoints" / "6").is_dir()
  assert [r["loss"] for r in metrics(tmp_path / "run")] == [r["loss"] for r in before]


@pytest.mark.slow  # trains a t2t model on top of the tokenizer fixture; t2t training is tested by
#                   tests/test_t2t.py and the pairs format by tests/test_materialize.py by default
def test_t2t_pairs_from_the_tokenizer_and_the_pairing_check(trained, corpus_dir, env, tmp_path):
  """`sptlm t2t train` makes its TTS pairs with a real speech tokenizer (once: a rerun keeps
  the shards), records it, and synthesis refuses another tokenizer."""
  t2t = tmp_path / "t2t"
  args = [*entry_point(), "t2t", "train", "--config", str(ROOT / "configs" / "t2t_tiny.py"),
          "--workdir", str(t2t), f"--config.data.tokenizer={trained}",
          f"--config.data.corpus={corpus_dir}", "--config.vocab.speech_size=32",
          "--config.model.num_layers=1", "--config.model.d_model=32",
          "--config.model.num_heads=2", "--config.model.num_kv_heads=2",
          "--config.model.head_dim=16", "--config.model.d_ff=64", "--config.data.seq_len=256",
          "--config.data.max_text_units=80", "--config.data.max_speech_tokens=150",
          "--config.data.global_batch_size=2", "--config.train.steps=2",
          "--config.train.warmup_steps=1", "--config.mesh.data=1"]
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  shards = sorted((t2t / "pairs").glob("*.jsonl"))
  assert [s.name for s in shards] == ["test-00000.jsonl", "train-00000.jsonl"]
  rows = [json.loads(x) for x in shards[1].read_text().splitlines()]
  assert len(rows) == 8 and all(len(r["tokens"]) > 0 for r in rows)
  ident = json.loads((t2t / "tokenizer.json").read_text())
  assert ident["path"] == str(trained) and ident["codebook_size"] == 32
  before = shards[1].stat().st_mtime_ns
  proc = subprocess.run([*args, "--config.train.steps=3"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert shards[1].stat().st_mtime_ns == before  # not made again
  ok = subprocess.run([*entry_point(), "t2t", "synthesize", "--workdir", str(t2t), "--text",
                       "the cat", "--tokenizer", str(trained)], cwd=ROOT, env=env,
                      capture_output=True, text=True, timeout=600)
  assert ok.returncode == 0, ok.stderr[-3000:]
  other = tmp_path / "other"
  shutil.copytree(trained, other)
  # another tokenizer: the same layout, other codes (one more training step moves them)
  run(["train", "--config", CONFIG, "--workdir", str(other), f"--config.data.corpus={corpus_dir}",
        "--config.train.steps=41", *TINY], env)
  bad = subprocess.run([*entry_point(), "t2t", "synthesize", "--workdir", str(t2t), "--text",
                        "the cat", "--tokenizer", str(other)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 1 and "learned the codes of the speech tokenizer" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_speech_asr_and_tts_tasks_tokenize_audio_manifests(trained, corpus_dir, tmp_path):
  """Data tasks over a `build-corpus` manifest ({"audio", "text"} lines): the audio goes
  through the speech tokenizer (vocab.speech_tokenizer), giving exactly its encode output; a
  missing audio file is skipped and counted."""
  from data_pipelines import config as data_config
  from data_pipelines.examples import ExampleBuilder
  from data_pipelines.sources import file_token_records
  from sptlm.speech.tokenizer import SpeechTokenizer
  from t2t_synthetic import data_config as data_config_file
  manifest = tmp_path / "manifest.jsonl"
  lines = (corpus_dir / "manifest.jsonl").read_text().splitlines()[:4]
  rows = [json.loads(x) for x in lines]
  for r in rows:  # relative to the manifest's folder: point them back at the corpus
    r["audio"] = str(corpus_dir / r["audio"])
  rows.append({"audio": str(tmp_path / "gone.wav"), "text": "nothing here"})
  manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  config = data_config_file(tmp_path / "data.py", "", f"""{{
      "speech": dict(kind="speech", files=("{manifest}",), rate=1.0),
      "asr": dict(kind="asr", files=("{manifest}",), rate=1.0)}}""",
                            speech_size=32, speech_tokenizer=trained)
  cfg = data_config.load(config)
  builder = ExampleBuilder(cfg)
  items = list(file_token_records(str(manifest), 32, need_text=True))
  want = [np.asarray(r["tokens"]) for r in SpeechTokenizer.load(str(trained), lm=None)
          .encode_files([r["audio"] for r in rows[:4]])]
  for kind in ("speech", "asr"):
    built = builder.build(kind, items)
    assert built[-1] == "unreadable audio files"
    for b, codes, row in zip(built[:4], want, rows):
      got = builder.layout.speech_code(b.ids[builder.layout.is_speech(b.ids)])
      assert (got == codes).all()
      if kind == "asr":  # the transcript follows the audio, in the loss
        assert builder.tokenizer.decode(b.ids[b.weights.astype(bool)][:-1].tolist()) == row["text"]


def test_eval_speech_from_audio_through_the_tokenizer(trained, corpus_dir, tmp_path):
  """`sptlm eval` with real audio: StoryCloze sentences from an audio manifest and spoken QA
  questions from a TSV's Wav Filename column go through the speech tokenizer (the same codes
  as `encode`), S->S answers come back as text through its ASR path, and a missing audio file
  is counted, not a crash. The LM has random weights: the plumbing is under test here."""
  import jax
  from data_pipelines import text_input
  from sptlm import config as config_lib
  from sptlm.eval import runner
  from sptlm.eval.lm import LanguageModel
  from sptlm.speech.tokenizer import SpeechTokenizer
  from sptlm.train import program as program_lib
  cfg = config_lib.load(ROOT / "configs" / "tiny.py", [
      "--config.model.num_layers=1", "--config.data.shards=", "--config.vocab.speech_size=32",
      "--config.eval.qa_max_new_speech_tokens=12", "--config.eval.qa_max_new_tokens=4"])
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))
  lm = LanguageModel.from_params(
      cfg, 0, program_lib.build(cfg, mesh).init()["params"],
      text_input.load_tokenizer(str(ROOT / cfg.vocab.text_tokenizer), 1024), mesh, "random")
  rows = [json.loads(x) for x in (corpus_dir / "manifest.jsonl").read_text().splitlines()]
  wavs = [str(corpus_dir / r["audio"]) for r in rows][:6]
  header = ("InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
            "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n")
  (tmp_path / "s.csv").write_text(header + "a,One.,Two.,Three.,Four.,Right.,Wrong.,1\n"
                                  "b,Uno.,Dos.,Tres.,Cuatro.,Bien.,Mal.,2\n")
  parts = ["InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
           "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2"]
  manifest = [{"story": "a", "part": p, "audio": w} for p, w in zip(parts, wavs)]
  manifest += [{"story": "b", "part": p, "audio": w} for p, w in zip(parts, wavs)]
  manifest[-1]["audio"] = str(tmp_path / "gone.wav")  # story b loses its spoken Mal.
  (tmp_path / "audio.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest)
                                        + "not json\n")
  res = runner.evaluate(str(tmp_path), "sstorycloze", str(tmp_path / "s.csv"),
                        settings=["S->S", "T->T"], audio=str(tmp_path / "audio.jsonl"),
                        speech_tokenizer=str(trained), lm=lm, out=str(tmp_path / "s.json"))
  spoken, text = res
  assert spoken["speech_source"].startswith("audio:") and text["speech_source"] is None
  assert (spoken["n"], text["n"]) == (1, 2)  # story b has no spoken wrong ending
  assert spoken["skipped"]["missing or unreadable audio files"] == 1
  assert spoken["skipped"]["stories without speech"] == 1
  tok = SpeechTokenizer.load(str(trained))
  tsv = tmp_path / "q.tsv"
  tsv.write_text("Questions\tAnswer\tWav Filename\n" + "".join(
      f"question {i}?\tanswer {i}\t{w}\n" for i, w in enumerate(wavs[:3]))
      + "question 9?\tx\tgone.wav\n")
  res = runner.evaluate(str(tmp_path), "spoken_qa", str(tsv), settings=["S->S", "S->T"],
                        speech_tokenizer=str(trained), lm=lm, out=str(tmp_path / "qa.json"))
  assert [(r["setting"], r["n"]) for r in res] == [("S->S", 3), ("S->T", 3)]
  assert res[0]["skipped"]["missing or unreadable audio files"] == 1
  assert res[0]["skipped"]["questions without speech"] == 1
  examples = [json.loads(x) for x in (tmp_path / "qa.examples.jsonl").read_text().splitlines()]
  spoken_answers = [e for e in examples if e["setting"] == "S->S"]
  # the S->S prediction is the tokenizer's transcript of the generated codes
  for e in spoken_answers:
    codes = np.asarray(e["answer_codes"], np.int32)
    assert e["prediction"] == (tok.decode([codes])[0] if codes.size else "")
  # the spoken question is exactly the tokenizer's encoding of the WAV
  want = [r["tokens"] for r in tok.encode_files(wavs[:1])][0]
  assert [e["prompt_tokens"] for e in spoken_answers][0] == len(
      lm.tokenizer.encode("Question: ")) + len(want) + 2 + len(lm.tokenizer.encode("\nAnswer:")) + 1


def test_tune_rechooses_the_lm_weights_at_the_full_beam(trained, corpus_dir, tmp_path, env):
  """`sptlm tokenizer tune`: the weights it writes decode `dev` at the run's beam no worse than
  the weights it started from (those are among its finalists), and the tokenizer loads them."""
  from sptlm.speech import manifest as manifest_lib
  from sptlm.speech import wer as wer_lib
  from sptlm.speech.tokenizer import SpeechTokenizer
  work = tmp_path / "run"
  shutil.copytree(trained, work)
  (work / "asr_decoding.json").write_text(json.dumps({"alpha": 1.2, "beta": 2.5}))
  out, _ = run(["tune", "--workdir", str(work), "--corpus", str(corpus_dir)], env)
  tuned = json.loads(out)
  assert json.loads((work / "asr_decoding.json").read_text()) == tuned
  assert tuned["split"] == "dev" and tuned["beam"] == 64 and tuned["grid_beam"] == 16
  source = manifest_lib.ManifestSource(corpus_dir)
  utts = source.utterances("dev")
  audio, refs = [source.load(u) for u in utts], [u.text for u in utts]
  tok = SpeechTokenizer.load(str(work))
  assert (tok.alpha, tok.beta) == (tuned["alpha"], tuned["beta"])
  assert wer_lib.wer(refs, tok.decode(tok.encode(audio))) == pytest.approx(tuned["wer"])
  before = SpeechTokenizer.load(str(work), alpha=1.2, beta=2.5)
  assert tuned["wer"] <= wer_lib.wer(refs, before.decode(before.encode(audio))) + 1e-12
  _, err = run(["tune", "--workdir", str(work), "--corpus", str(corpus_dir), "--split", "nope"],
                env, code=1)
  assert "no utterances in split 'nope'" in err and len(err.strip().splitlines()) == 1


def test_build_lm_retrains_the_lm_and_keeps_the_one_it_replaces(trained, corpus_dir, tmp_path,
                                                                  env):
  """`sptlm tokenizer build-lm`: another order and text, held-out sentences still left out,
  the replaced LM kept byte for byte; bad text: one line and nothing touched."""
  from sptlm.speech.ngram_lm import NgramLM
  work = tmp_path / "run"
  shutil.copytree(trained, work)
  first = (work / "asr_lm.arpa").read_bytes()
  text = tmp_path / "text"
  text.mkdir()
  (text / "new.txt").write_text("The platypus swims at dawn.\n")
  (text / "more.txt").write_text("\n\n".join([s.capitalize() + "." for s in SENTENCES]
                                             + ["A zebra grazes."]))
  out, err = run(["build-lm", "--workdir", str(work), "--corpus", str(corpus_dir),
                  "--order", "2", "--lm-text", str(text)], env)
  got = json.loads(out)
  assert got["order"] == 2 and got["previous"] == str(work / "asr_lm.previous1.arpa")
  assert (work / "asr_lm.previous1.arpa").read_bytes() == first
  assert "sptlm tokenizer tune --workdir" in err
  assert "4 held-out sentences" in err  # the corpus's test and dev sentences in more.txt
  lm = NgramLM.load_arpa(work / "asr_lm.arpa")
  assert lm.order == 2 and got["ngrams"] == lm.num_ngrams() and got["vocab"] == len(lm.vocab)
  assert {"platypus", "zebra"} <= lm.vocab and "quokka" not in lm.vocab
  second = (work / "asr_lm.arpa").read_bytes()
  _, err = run(["build-lm", "--workdir", str(work), "--corpus", str(corpus_dir),
                "--lm-text", str(tmp_path / "nope.txt")], env, code=1)
  assert err.strip().splitlines() == [
      f"sptlm tokenizer: error: --lm-text {tmp_path / 'nope.txt'} not found"], err
  assert (work / "asr_lm.arpa").read_bytes() == second
  assert not (work / "asr_lm.previous2.arpa").exists()
  # the run's own text and order again: the quokka of the run's asr.lm_text is back
  out, _ = run(["build-lm", "--workdir", str(work), "--corpus", str(corpus_dir)], env)
  assert json.loads(out)["previous"] == str(work / "asr_lm.previous2.arpa")
  assert (work / "asr_lm.previous2.arpa").read_bytes() == second
  assert (work / "asr_lm.arpa").read_bytes() == first


def test_evaluate_per_engine_and_condition(trained, tmp_path, env):
  """`sptlm tokenizer evaluate` on a corpus said by several engines: one row per split, engine
  and condition, its clean WER/CER the tokenizer's own transcripts scored directly, token
  agreement for every pair of engines; and a work directory written before data.augment
  existed still loads with the same codes."""
  from sptlm.speech import manifest as manifest_lib
  from sptlm.speech import engines as engines_lib
  from sptlm.speech import wer as wer_lib
  from sptlm.speech.tokenizer import SpeechTokenizer
  names = ["espeak"] + [e for e in ("flite", "piper") if engines_lib.get(e).missing() is None]
  text = tmp_path / "sentences.txt"
  text.write_text("\n\n".join(s.capitalize() + "." for s in SENTENCES) + "\n")
  corpus = tmp_path / "corpus"
  _, err = run(["build-corpus", "--out", str(corpus), "--text", str(text),
                 "--no-default-text", "--train", "4", "--test", "2", "--dev", "1",
                 "--heldout-variants", "4", "--engines", ",".join(names),
                 "--heldout-engine", names[-1]], env)
  out, err = run(["evaluate", "--workdir", str(trained), "--corpus", str(corpus),
                   "--out", str(tmp_path / "eval.json"),
                   "--transcripts", str(tmp_path / "hyps" / "t.jsonl")], env)
  result = json.loads((tmp_path / "eval.json").read_text())
  cells = {(r["split"], r["engine"], r["condition"]): r for r in result["cells"]}
  want = {("test", e) for e in names[:-1]} | {("test_engine", names[-1])}
  assert set(cells) == {(s, e, c) for s, e in want for c in ("clean", "noisy", "telephone")}
  assert "| test | espeak | 2 |" in out
  tok = SpeechTokenizer.load(str(trained))
  source = manifest_lib.ManifestSource(corpus)
  utts = [u for u in source.utterances("test") if u.engine == "espeak"]
  hyps = tok.decode(tok.encode([source.load(u) for u in utts]))
  refs = [u.text for u in utts]
  clean = cells[("test", "espeak", "clean")]
  assert clean["wer"] == pytest.approx(wer_lib.wer(refs, hyps))
  assert clean["cer"] == pytest.approx(wer_lib.cer(refs, hyps))
  # --transcripts: a row per utterance and condition, whose edits add up to the cell's scores
  rows = [json.loads(line) for line in (tmp_path / "hyps" / "t.jsonl").read_text().splitlines()]
  assert f"{len(rows)} transcripts" in err and "transcripts" not in result
  assert len(rows) == sum(c["utterances"] for c in result["cells"])
  mine = [r for r in rows if (r["split"], r["engine"], r["condition"]) == ("test", "espeak",
                                                                           "clean")]
  assert [(r["id"], r["ref"], r["hyp"]) for r in mine] == [(u.id, u.text, h)
                                                           for u, h in zip(utts, hyps)]
  assert sum(r["word_edits"] for r in mine) / sum(r["words"] for r in mine) == pytest.approx(
      clean["wer"])
  assert sum(r["char_edits"] for r in mine) / sum(r["chars"] for r in mine) == pytest.approx(
      clean["cer"])
  greedy_mine = [r["greedy"] for r in mine]
  assert wer_lib.wer(refs, greedy_mine) == pytest.approx(clean["wer_greedy"])
  _, err = run(["evaluate", "--workdir", str(trained), "--corpus", str(corpus),
                 "--transcripts", str(tmp_path / "hyps")], env, code=1)
  assert err.strip().splitlines() == [f"sptlm tokenizer: error: --transcripts {tmp_path / 'hyps'} "
                                      "is a directory; give a file name"], err
  blocked = tmp_path / "hyps" / "t.jsonl" / "deeper" / "u.json"  # a parent that is a file
  _, err = run(["evaluate", "--workdir", str(trained), "--corpus", str(corpus),
                 "--out", str(blocked)], env, code=1)
  assert err.strip().splitlines() == [f"sptlm tokenizer: error: --out {blocked}: "
                                      f"{tmp_path / 'hyps' / 't.jsonl'} is a file, not a "
                                      "directory; give another path"], err
  assert 0 < clean["code_usage"] <= 1
  pairs = result["agreement"]["across_engines"]
  assert len(pairs) == len(names) * (len(names) - 1) // 2
  assert all(p["sentences"] == 2 and 0 <= p["agreement"] <= 1 for p in pairs.values())
  assert clean["one_token_per_1280_samples"]
  # --beam 1: greedy CTC, so the LM column is the greedy one
  run(["evaluate", "--workdir", str(trained), "--corpus", str(corpus), "--splits", "test",
        "--conditions", "clean", "--beam", "1", "--out", str(tmp_path / "greedy.json")], env)
  greedy = json.loads((tmp_path / "greedy.json").read_text())["cells"]
  espeak = [c for c in greedy if c["engine"] == "espeak"][0]
  assert espeak["wer"] == pytest.approx(clean["wer_greedy"])
  assert espeak["cer"] == pytest.approx(clean["cer_greedy"])
  # long audio in windows vs one pass (a small window so these short clips span several)
  from sptlm.speech import robust_eval
  long = np.concatenate([source.load(u) for u in source.utterances("test")])
  windowed = SpeechTokenizer.load(str(trained))
  windowed.window = 60  # more than its 2 x 25 tokens of context
  res = robust_eval.chunked_vs_whole(windowed, long)
  assert res["tokens"] == res["tokens_whole"] == -(-len(long) // 1280) > 60
  assert res["agreement"] == 1.0
  # an older work directory: its config.json has no data.augment
  old = tmp_path / "old_run"
  shutil.copytree(trained, old)
  raw = json.loads((old / "config.json").read_text())
  raw["data"].pop("augment", None)
  (old / "config.json").write_text(json.dumps(raw))
  audio = [source.load(u) for u in utts]
  for a, b in zip(SpeechTokenizer.load(str(old)).encode(audio), tok.encode(audio)):
    np.testing.assert_array_equal(a, b)
