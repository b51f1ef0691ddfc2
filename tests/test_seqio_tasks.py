"""seqio: the speech-text vocabulary, text and interleaved tasks, and a mixture's shares."""

import json
import pathlib

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from data_pipelines import interleave as il  # noqa: E402
from data_pipelines import tasks  # noqa: E402
from data_pipelines import text_tokenizer as tt  # noqa: E402
from data_pipelines.seqio_vocab import SpeechTextVocabulary  # noqa: E402
from data_pipelines.vocabulary import Vocabulary  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SP = str(ROOT / "data_pipelines" / "assets" / "tiny_sp1024.model")
CORPUS = str(ROOT / "data_pipelines" / "assets" / "tinyshakespeare.txt")
K = 64


def _speak(texts: list[str]) -> list[np.ndarray]:
  """A stand-in voice for the task plumbing (test_t2t runs the real text-to-token model)."""
  return [np.array([ord(c) - ord("a") for c in t.lower() if "a" <= c <= "z"], np.int32)
          for t in texts]


@pytest.fixture(scope="module")
def vocab() -> SpeechTextVocabulary:
  return SpeechTextVocabulary(tt.load(SP), Vocabulary(1024, K))


def test_the_vocabulary_maps_markers_and_text_both_ways(vocab):
  layout = vocab.layout
  ids = vocab.encode("the cat <|begin_of_audio|><|audio_12|><|audio_63|><|end_of_audio|> sat")
  boa, eoa = layout.special_id("<|begin_of_audio|>"), layout.special_id("<|end_of_audio|>")
  i = ids.index(boa)
  assert ids[i:i + 4] == [boa, layout.speech_start + 12, layout.speech_start + 63, eoa]
  assert vocab.decode(ids) == ("the cat<|begin_of_audio|><|audio_12|><|audio_63|>"
                               "<|end_of_audio|>sat")
  assert vocab.readable(ids, ["meow"]) == 'the cat [audio: 2 tokens "meow"] sat'
  mask_t, mask_s = vocab.text_mask(np.array(ids)), vocab.speech_mask(np.array(ids))
  assert mask_s.sum() == 2 and mask_t.sum() == len(ids) - 4
  assert vocab.vocab_size == layout.size and vocab.pad_id == layout.special_id("<|pad|>")
  assert vocab.eos_id == 3  # the SentencePiece model's own
  assert vocab.encode("<|unknown_tag|>") == vocab.tokenizer.encode("<|unknown_tag|>")
  with pytest.raises(ValueError, match="speech code 64 is outside the codebook"):
    vocab.encode("<|audio_64|>")
  tf_ids = vocab.encode_tf(np.array("a <|audio_5|>".encode()))
  assert list(tf_ids.numpy()) == vocab.encode("a <|audio_5|>")
  assert vocab.decode_tf(tf_ids[None]).numpy()[0].decode() == vocab.decode(list(tf_ids.numpy()))


def test_text_and_interleaved_tasks_give_targets_through_seqio(vocab, tmp_path):
  jsonl = tmp_path / "docs.jsonl"
  docs = [d for d in tasks.read_documents([CORPUS]) if len(d) > 300][:6]
  jsonl.write_text("\n".join([json.dumps({"text": d}) for d in docs] + ["not json", "{}"]))
  tasks.SOURCE_COUNTS.clear()
  text = tasks.text_task("test_text", [str(jsonl), str(tmp_path / "missing.txt")], vocab)
  got = list(text.get_dataset({"targets": 4096}, split="train", shuffle=False).as_numpy_iterator())
  assert len(got) == 6
  assert got[0]["targets"][-1] == vocab.eos_id
  assert list(got[0]["targets"][:-1]) == vocab.tokenizer.encode(docs[0])
  assert tasks.SOURCE_COUNTS == {"unreadable lines": 2, "missing files": 1}

  inter = il.Interleaver(vocab.tokenizer, vocab.layout, _speak, seed=1)
  task = tasks.interleaved_task("test_interleaved", [str(jsonl)], vocab, inter, batch=4)
  rows = list(task.get_dataset({"targets": 4096}, split="train",
                               shuffle=False).as_numpy_iterator())
  direct = il.Interleaver(vocab.tokenizer, vocab.layout, _speak, seed=1)(docs)
  assert len(rows) == 6
  for row, ex in zip(rows, direct):  # the task is the interleaver, in batches of 4
    assert (row["targets"][:-1] == ex.ids).all() and row["targets"][-1] == vocab.eos_id
    assert vocab.speech_mask(row["targets"]).any()
  seqio.TaskRegistry.remove("test_text")
  seqio.TaskRegistry.remove("test_interleaved")


def test_a_mixture_samples_its_tasks_at_their_rates(vocab):
  """Text 3 : interleaved 1; an interleaved example is the one that has speech in it."""
  tasks.text_task("mix_text", [CORPUS], vocab)
  inter = il.Interleaver(vocab.tokenizer, vocab.layout, _speak, seed=0)
  tasks.interleaved_task("mix_speech", [CORPUS], vocab, inter, batch=64)
  mix = seqio.MixtureRegistry.add("mix_test", [("mix_text", 3.0), ("mix_speech", 1.0)])
  ds = mix.get_dataset({"targets": 256}, split="train", shuffle=False, seed=0)
  n = 1500
  speech = sum(bool(vocab.speech_mask(ex["targets"]).any())
               for ex in ds.take(n).as_numpy_iterator())
  assert abs(speech / n - 0.25) < 0.04, speech / n  # binomial sd 0.011
  seqio.MixtureRegistry.remove("mix_test")
  for name in ("mix_text", "mix_speech"):
    seqio.TaskRegistry.remove(name)


def test_speech_asr_and_tts_tasks_lay_out_records_and_weigh_the_target_part(vocab, tmp_path):
  layout = vocab.layout
  boa, eoa = layout.special_id("<|begin_of_audio|>"), layout.special_id("<|end_of_audio|>")
  records = tmp_path / "pairs.jsonl"
  records.write_text("\n".join([
      json.dumps({"text": "good night", "tokens": [3, 1, 4]}),
      json.dumps({"audio": "a.wav", "seconds": 0.2, "tokens": [5, 9]}),  # no text
      json.dumps({"text": "out of range", "tokens": [2, K]}),
      json.dumps({"text": "nothing said", "tokens": []}),
      "{broken",
  ]))
  words = vocab.tokenizer.encode("good night")
  s = lambda codes: [layout.speech_start + c for c in codes]  # noqa: E731
  tasks.SOURCE_COUNTS.clear()
  got = {}
  for kind, make in (("speech", tasks.speech_task), ("asr", tasks.asr_task),
                     ("tts", tasks.tts_task)):
    task = make(f"test_{kind}", [str(records)], vocab)
    got[kind] = list(task.get_dataset({"targets": 64, "weights": 64}, split="train",
                                      shuffle=False).as_numpy_iterator())
    seqio.TaskRegistry.remove(f"test_{kind}")
  speech = got["speech"]
  assert [list(x["targets"]) for x in speech] == [
      [boa, *s([3, 1, 4]), eoa, vocab.eos_id], [boa, *s([5, 9]), eoa, vocab.eos_id]]
  assert all((x["weights"] == 1).all() for x in speech)
  (asr,) = got["asr"]  # the record without text is not a pair: counted, skipped
  assert list(asr["targets"]) == [boa, *s([3, 1, 4]), eoa, *words, vocab.eos_id]
  assert list(asr["weights"]) == [0] * 5 + [1] * (len(words) + 1)
  (tts,) = got["tts"]
  assert list(tts["targets"]) == [*words, boa, *s([3, 1, 4]), eoa]
  assert list(tts["weights"]) == [0] * (len(words) + 1) + [1] * 4
  assert tasks.SOURCE_COUNTS["records with speech codes outside the codebook"] == 3
  assert tasks.SOURCE_COUNTS["records without speech tokens"] == 3
  assert tasks.SOURCE_COUNTS["unreadable lines"] == 3
  assert tasks.SOURCE_COUNTS["records with an empty text"] == 2  # asr and tts


def test_text_tasks_read_prepared_tfds_datasets(vocab, tmp_path, monkeypatch):
  """`tfds:NAME:SPLIT[:FEATURE]` in a task's files: a prepared TFDS text dataset, read
  without download; non-UTF-8 and empty documents counted; a missing dataset counted."""
  tfds = pytest.importorskip("tensorflow_datasets")
  texts = ["The first document.", "A second, longer document.", "", "Third one."]

  class TinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "body": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, t in enumerate(texts):
        yield i, {"body": t}

  TinyText(data_dir=str(tmp_path)).download_and_prepare()
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  tasks.SOURCE_COUNTS.clear()
  docs = list(tasks.read_documents(["tfds:tiny_text:train:body", "tfds:not_there"]))
  assert sorted(docs) == sorted(t for t in texts if t)  # in the order TFDS stored them
  assert tasks.SOURCE_COUNTS == {
      "empty documents": 1,
      "missing TFDS datasets (prepare them first; nothing is downloaded)": 1}
  task = tasks.text_task("tfds_text", ["tfds:tiny_text:train:body"], vocab)
  rows = list(task.get_dataset({"targets": 64}, split="train", shuffle=False)
              .as_numpy_iterator())
  seqio.TaskRegistry.remove("tfds_text")
  assert [vocab.decode(list(r["targets"][:-1])) for r in rows] == docs
