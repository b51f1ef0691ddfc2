"""Issue 15's acceptance, end to end on CPU: a GLM-4-Voice-layout model imported with from-hf,
trained a few steps on speech tokens from the imported WhisperVQ tokenizer, exported again,
loads in transformers and generates.

A tiny random ChatGLM folder whose tokenizer holds `<|audio_0|>`.. after its specials
(test_convert_chatglm's helpers) is imported, so the run adopts the base's ids; a tiny random
WhisperVQ checkpoint (whisper_vq_reference) is imported with `sptlm tokenizer import` and
tokenizes espeak-ng clips into speech-token JSON lines; a data config that adopts the same
layout feeds `sptlm train` for 3 steps from the import. The `to-hf` export then equals sptlm's
logits on text, speech and mixed input in transformers, generates from a speech prompt, and
`sptlm eval` reads it back with the adopted layout, scoring text as the run does.
"""

import dataclasses
import json
import math
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if shutil.which("espeak-ng") is None:
  pytest.skip("espeak-ng is not installed (scripts/setup.sh)", allow_module_level=True)

import whisper_vq_reference as ref  # noqa: E402
from test_convert import CORPUS, TINY  # noqa: E402
from test_convert_chatglm import chatglm_config, chatglm_tensors  # noqa: E402
from test_convert_chatglm import write_chatglm  # noqa: E402
from test_convert_glm4_voice import K, ROWS, write_voice_tokenizer  # noqa: E402
from test_whisper_vq import SENTENCES  # noqa: E402

from data_pipelines import mixture_input, records  # noqa: E402
from data_pipelines.vocabulary import Vocabulary  # noqa: E402
from sptlm import cli  # noqa: E402
from sptlm import config as config_lib  # noqa: E402
from sptlm.convert import verify  # noqa: E402
from sptlm.errors import InputError  # noqa: E402
from sptlm.speech import audio as audio_lib  # noqa: E402
from sptlm.speech.tokenizer import SpeechTokenizer  # noqa: E402

TOL = 1e-4
SPEECH_START = 1030  # write_voice_tokenizer's <|audio_0|>: 1024 text ids, then 6 specials
BEGIN_OF_AUDIO = 1028
TRAIN = ["--config.train.steps=3", "--config.train.warmup_steps=1", "--config.train.log_every=1",
         "--config.train.checkpoint_every=3", "--config.data.seq_len=64",
         "--config.data.global_batch_size=8", "--config.data.num_shards=1",
         "--config.data.packing_bins=4"]


def _write_data_config(path: pathlib.Path, vocab: config_lib.VocabConfig, speech: pathlib.Path,
                       text: pathlib.Path, speech_tokenizer: pathlib.Path) -> pathlib.Path:
  """A data config with a speech task and a small text task over the run's adopted layout."""
  v = {"text_tokenizer": vocab.text_tokenizer, "text_size": vocab.text_size,
       "speech_size": vocab.speech_size, "speech_tokenizer": str(speech_tokenizer),
       "speech_offset": vocab.speech_offset, "special_offset": vocab.special_offset,
       "special_ids": [list(p) for p in vocab.special_ids]}
  tasks = {"speech": {"kind": "speech", "files": [str(speech)], "rate": 3.0, "shards": 1},
           "text": {"kind": "text", "files": [str(text)], "rate": 1.0, "shards": 1}}
  path.write_text(f'''
import ml_collections
def get_config():
  c = ml_collections.ConfigDict()
  c.name = "glm4_voice_e2e"
  c.kind = "data"
  c.vocab = {v!r}
  c.interleave = dict(lam=10.0, eta=0.3, seed=0, t2t="", batch=8)
  c.tasks = {tasks!r}
  return c
''')
  return path


def test_imported_glm4_voice_trains_on_its_speech_tokens_and_exports(tmp_path, capsys):
  # (1) A GLM-4-Voice-layout base: ChatGLM tensors, <|audio_k|> after the base's specials.
  raw = chatglm_config(padded_vocab_size=ROWS)
  tensors = chatglm_tensors(raw)
  rng = np.random.default_rng(5)
  tensors["transformer.embedding.word_embeddings.weight"] = rng.standard_normal(
      (ROWS, 96)).astype(np.float32)
  tensors["transformer.output_layer.weight"] = 0.1 * rng.standard_normal(
      (ROWS, 96)).astype(np.float32)
  write_chatglm(tmp_path / "src", raw, tensors)
  write_voice_tokenizer(tmp_path / "src")
  out = tmp_path / "imported"
  assert cli.main(["convert", "from-hf", "--hf", str(tmp_path / "src"), "--config", str(TINY),
                   "--out", str(out)]) == 0
  run_cfg = config_lib.load(out / "config.py")
  vocab = Vocabulary.from_config(run_cfg.vocab)
  assert (vocab.speech_start, vocab.speech_size, vocab.size) == (SPEECH_START, K, ROWS)
  assert vocab.special_id("<|begin_of_audio|>") == BEGIN_OF_AUDIO

  # (2) A WhisperVQ checkpoint with K codes, imported; (3) espeak-ng clips as its codes.
  wavs = []
  for i, (voice, sentence) in enumerate(SENTENCES[:3]):
    wavs.append(tmp_path / f"clip{i}.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(wavs[-1]), sentence], check=True)
  calibration = np.concatenate([audio_lib.read(w).samples for w in wavs])
  ref.build(ref.small_config(quantize_vocab_size=K), calibration).save(tmp_path / "vq")
  assert cli.main(["tokenizer", "import", "--from", str(tmp_path / "vq"), "--workdir",
                   str(tmp_path / "vq_tok")]) == 0
  coded = SpeechTokenizer.load(str(tmp_path / "vq_tok"), lm=None).encode_files(
      [str(w) for w in wavs])
  codes = [r["tokens"] for r in coded]
  assert all(len(c) > 20 for c in codes) and len(set(sum(codes, []))) > 8
  speech = tmp_path / "speech.jsonl"
  speech.write_text("".join(json.dumps({"tokens": c}) + "\n" for c in codes))
  text = tmp_path / "text.txt"
  docs = [d for d in CORPUS.read_text().split("\n\n") if d.strip()][:12]
  text.write_text("\n\n".join(docs))

  # (4) The data config adopts the run's layout: speech codes land at the base's ids.
  data = _write_data_config(tmp_path / "data.py", run_cfg.vocab, speech, text,
                            tmp_path / "vq_tok")
  _, built, _ = mixture_input.build_in_memory(str(data))
  laid_out = [records.decode(r)[0] for r in built["speech"]]
  for ids, c in zip(sorted(laid_out, key=len), sorted(codes, key=len)):
    assert ids[0] == BEGIN_OF_AUDIO
    np.testing.assert_array_equal(ids[vocab.is_speech(ids)], np.asarray(c) + SPEECH_START)
  batches, _ = mixture_input.shard_batches(
      str(data), rates=None, seq_len=64, global_batch=4, num_shards=1, packing_bins=4, seed=0,
      vocab_sizes=vocab)
  inputs = np.concatenate([next(batches)["inputs"] for _ in range(3)])
  assert vocab.is_speech(inputs).any() and vocab.is_text(inputs).any()
  assert inputs[vocab.is_speech(inputs)].min() >= SPEECH_START
  own = Vocabulary(run_cfg.vocab.text_size, K)  # sptlm's layout: same sizes, other ids
  with pytest.raises(InputError, match=r"vocab\.speech_offset=1030 .*-1") as info:
    mixture_input.shard_batches(str(data), rates=None, seq_len=64, global_batch=4,
                                num_shards=1, packing_bins=4, seed=0, vocab_sizes=own)
  assert "\n" not in str(info.value)

  # (5) Three steps from the import on that mixture.
  run = tmp_path / "run"
  capsys.readouterr()
  assert cli.main(["train", "--config", str(out / "config.py"), "--workdir", str(run),
                   f"--config.train.init_from={out}", f"--config.data.shards={data}",
                   *TRAIN]) == 0
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
  assert any(math.isfinite(r.get("loss_speech", math.nan)) and r["loss_speech"] > 0
             for r in rows)

  # (6) Back to Hugging Face: transformers' logits equal sptlm's, and it generates.
  hf = tmp_path / "hf"
  assert cli.main(["convert", "to-hf", "--workdir", str(run), "--out", str(hf)]) == 0
  compared = verify.compare(str(run), str(hf))
  assert [r.kind for r in compared] == ["text", "speech", "mixed"]
  assert max(r.max_abs_diff for r in compared) < TOL, verify.format_rows(compared)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
  assert type(model).__name__ == "GlmForCausalLM"
  prompt = torch.tensor([[BEGIN_OF_AUDIO] + [SPEECH_START + c for c in codes[0][:12]]])
  generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
  assert generated.shape == (1, prompt.shape[1] + 6)
  assert torch.equal(generated[:, :prompt.shape[1]], prompt)

  # (7) `sptlm eval` reads the export with the adopted layout and scores text as the run does.
  # Documents shorter than either model's window (the export's max_position_embeddings is the
  # ChatGLM source's seq_length, not the run's data.seq_len), so both score one pass each.
  short = [d for d in CORPUS.read_text().split("\n\n")[40:] if 8 <= len(d.split()) <= 25]
  held_out = tmp_path / "held_out.txt"
  held_out.write_text("\n\n".join(short[:6]))
  scores = {}
  for name, workdir in (("run", run), ("hf", hf)):
    result = tmp_path / f"ppl_{name}.json"
    assert cli.main(["eval", "--workdir", str(workdir), "--task", "perplexity", "--data",
                     str(held_out), "--setting", "T", "--out", str(result)]) == 0
    (scores[name],) = json.loads(result.read_text())
  assert scores["hf"]["tokens"] == scores["run"]["tokens"] > 0
  np.testing.assert_allclose(scores["hf"]["perplexity"], scores["run"]["perplexity"], rtol=TOL)
  from sptlm.eval import hf_model
  fields = hf_model.vocabulary(hf, ROWS)
  assert Vocabulary.from_config(run_cfg.vocab).speech_start == fields["speech_offset"]
  for name in vocab.special_names:
    assert dict(fields["special_ids"])[name] == vocab.special_id(name), name


def test_data_config_adopted_layout_is_checked_in_one_line(tmp_path):
  """A data config's adopted keys go through the LM config's own check of the layout."""
  from data_pipelines import config as data_config
  from sptlm.config import ConfigError
  good = config_lib.VocabConfig(text_tokenizer="tok", text_size=ROWS, speech_size=K,
                                speech_offset=SPEECH_START, special_offset=1094,
                                special_ids=(("<|begin_of_audio|>", BEGIN_OF_AUDIO),))
  files = [tmp_path / "s.jsonl", tmp_path / "t.txt"]
  path = _write_data_config(tmp_path / "data.py", good, *files, tmp_path / "tok")
  vocab = data_config.load(path).vocab
  assert (vocab.speech_offset, vocab.special_ids) == (
      SPEECH_START, (("<|begin_of_audio|>", BEGIN_OF_AUDIO),))
  for override, named in (("--config.vocab.speech_offset=1000", "overlap"),
                          ("--config.vocab.special_offset=-2", "vocab.special_offset=-2")):
    with pytest.raises(ConfigError, match=named) as info:
      data_config.load(path, [override])
    assert "\n" not in str(info.value)
  bad = _write_data_config(tmp_path / "bad.py", dataclasses.replace(
      good, special_ids=(("<|nope|>", 3),)),
      *files, tmp_path / "tok")
  with pytest.raises(ConfigError, match=r"vocab.special_ids: '<\|nope\|>'"):
    data_config.load(bad)
