"""A ChatGLM base whose tokenizer already holds the speech tokens (GLM-4-Voice's layout):
from-hf adopts its ids (nothing appended; <|audio_k|> and the specials keep their rows), the
export round-trips through transformers, and a tokenizer with a gap in its speech tokens is
refused. The random ChatGLM folders come from tests/test_convert_chatglm.py."""

import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from sptlm.convert import to_hf, tokenizer, verify  # noqa: E402
from test_convert import ATOL, SP_MODEL, TINY, safetensors_dict, sp_encode  # noqa: E402
from test_convert_chatglm import _refused, chatglm_config, chatglm_logits  # noqa: E402
from test_convert_chatglm import chatglm_tensors, run_from_hf, write_chatglm  # noqa: E402

BASE_SPECIALS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                 "<|begin_of_audio|>", "<|end_of_audio|>")
K = 64  # the tiny base's audio tokens
ROWS = 1152  # its padded_vocab_size: 1024 text + 6 specials + 64 audio = 1094 ids, then padding


def write_voice_tokenizer(folder: pathlib.Path, audio: list[str] | None = None) -> None:
  """Text ids, then the base's specials, then <|audio_0|>.. (as glm-4-voice-9b orders them)."""
  from tokenizers import AddedToken
  tok = tokenizer.from_sentencepiece(SP_MODEL)
  tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in BASE_SPECIALS],
                 special_tokens=True)
  audio = audio if audio is not None else [tokenizer.speech_token(k) for k in range(K)]
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in audio])
  tok.save_pretrained(str(folder))


def test_vocabulary_adopts_a_base_tokenizers_ids():
  from data_pipelines.vocabulary import SPECIAL_TOKENS, Vocabulary, adopt
  ids = {name: 1024 + i for i, name in enumerate(BASE_SPECIALS)}
  ids.update({tokenizer.speech_token(k): 1030 + k for k in range(K)})
  v = adopt(ROWS, ids, 1094)
  assert (v.speech_start, v.speech_size, v.special_start, v.size) == (1030, K, 1094, ROWS)
  assert v.specials == ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
  assert set(v.special_names) == set(SPECIAL_TOKENS)
  assert v.special_id("<|user|>") == 1026 and v.special_id("<|pad|>") == 1096
  np.testing.assert_array_equal(v.speech_id(np.array([0, 63])), [1030, 1093])
  all_ids = np.arange(v.size)
  speech, text = v.is_speech(all_ids), v.is_text(all_ids)
  assert speech.sum() == K and not (speech & text).any()
  specials = [v.special_id(n) for n in SPECIAL_TOKENS]
  assert not text[specials].any() and not speech[specials].any()
  assert text.sum() == ROWS - K - len(SPECIAL_TOKENS)
  assert [v.token_name(i) for i in (1026, 1030, 1093, 1096)] == [
      "<|user|>", "<|audio_0|>", "<|audio_63|>", "<|pad|>"]
  # As a config's vocab section gives it (the layout OUT/config.json records).
  assert v == Vocabulary.of(ROWS, K, speech_offset=1030, special_offset=1094,
                            special_ids=v.adopted)
  # No room left in the base's rows: the missing specials go after them.
  assert adopt(1094, ids, 1094).special_start == 1094 and adopt(1094, ids, 1094).size == 1152
  assert adopt(1024, {"<|user|>": 5}, 1024) is None  # no speech tokens: sptlm's own layout
  # sptlm's own layout is unchanged by the new fields.
  own = Vocabulary(1024, 1024)
  assert own == Vocabulary.of(1024, 1024) and not own.is_adopted
  assert (own.speech_start, own.special_start, own.size) == (1024, 2048, 2176)
  with pytest.raises(ValueError, match="overlap"):
    Vocabulary.of(ROWS, K, speech_offset=1030, special_ids=(("<|user|>", 1031),))
  with pytest.raises(ValueError, match=r"<\|audio_3\|> has id None"):
    adopt(ROWS, {k: i for k, i in ids.items() if k != "<|audio_3|>"}, 1094)


def test_glm4_voice_layout_keeps_its_speech_and_special_rows(tmp_path, capsys):
  """from-hf of a ChatGLM model whose tokenizer has the speech tokens: nothing is appended,
  <|audio_k|> and <|user|> keep the base's ids and rows, the missing specials take 3 padding
  rows; the export's tokenizer and GlmForCausalLM agree with sptlm on speech and mixed input."""
  raw = chatglm_config(padded_vocab_size=ROWS)
  tensors = chatglm_tensors(raw)
  tensors["transformer.embedding.word_embeddings.weight"] = np.random.default_rng(5) \
      .standard_normal((ROWS, 96)).astype(np.float32)
  tensors["transformer.output_layer.weight"] = np.random.default_rng(6) \
      .standard_normal((ROWS, 96)).astype(np.float32) * 0.1
  write_chatglm(tmp_path / "src", raw, tensors)
  write_voice_tokenizer(tmp_path / "src")
  run_from_hf(tmp_path / "src", tmp_path / "imported")
  out = capsys.readouterr().out
  for row in ("vocab.text_size: 1024 -> 1152", "vocab.speech_size: 1024 -> 64",
              "vocab.speech_offset: -1 -> 1030", "vocab.special_offset: -1 -> 1094",
              "<|begin_of_text|>, <|end_of_text|>, <|pad|> in unused rows and 0 new rows"):
    assert row in out, row

  cfg, ours = verify.sptlm_logits_fn(str(tmp_path / "imported"))
  from sptlm.convert import checkpoints
  vocab = checkpoints.vocabulary(cfg)
  assert vocab.size == ROWS and vocab.special_id("<|begin_of_audio|>") == 1028
  reader = checkpoints.ParamReader(str(tmp_path / "imported"))
  embed = reader.read(("embed",))
  reader.close()
  source = tensors["transformer.embedding.word_embeddings.weight"]
  kept = np.r_[0:1094, 1097:ROWS]
  np.testing.assert_array_equal(embed[kept], source[kept])
  mean = source[:1094].astype(np.float64).mean(0)
  assert np.abs(embed[1094:1097] - mean).max() < 1e-3  # the mean recipe, in the padding rows

  # The base's own speech ids through sptlm == the ChatGLM math on the source tensors.
  mixed = verify.inputs(cfg, sp_encode)["mixed"]
  assert vocab.is_speech(mixed).sum() > 20 and 1028 in mixed and 1029 in mixed
  reference = chatglm_logits(raw, safetensors_dict(tmp_path / "src"), mixed[0])
  np.testing.assert_allclose(ours(mixed)[0][:, kept], reference[:, kept], rtol=0, atol=ATOL)

  # Back to Hugging Face: the base's tokenizer, its ids, plus the three new specials.
  to_hf.export(str(tmp_path / "imported"), str(tmp_path / "hf"))
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  assert len(auto) == 1097 and auto.convert_tokens_to_ids("<|audio_5|>") == 1035
  assert auto.convert_tokens_to_ids("<|user|>") == 1026  # its own, not renamed
  assert auto.convert_tokens_to_ids("<|pad|>") == 1096
  text = "Speak.<|begin_of_audio|><|audio_3|><|audio_63|><|end_of_audio|><|pad|>"
  assert auto(text)["input_ids"] == sp_encode("Speak.") + [1028, 1033, 1093, 1029, 1096]
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == ROWS
  rows = verify.compare(str(tmp_path / "imported"), str(tmp_path / "hf"))
  assert [r.kind for r in rows] == ["text", "speech", "mixed"]
  assert max(r.max_abs_diff for r in rows) < ATOL

  # OUT/config.py is that run, the layout included.
  from sptlm import config as config_lib
  run = config_lib.load(tmp_path / "imported" / "config.py")
  assert run.vocab == cfg.vocab and run.vocab.special_ids == vocab.adopted


def test_a_tokenizer_with_a_gap_in_its_speech_tokens_is_refused(tmp_path):
  raw = chatglm_config(padded_vocab_size=ROWS)
  write_chatglm(tmp_path / "src", raw, chatglm_tensors(raw))
  audio = [tokenizer.speech_token(k) for k in range(K) if k != 7]
  write_voice_tokenizer(tmp_path / "src", audio)
  message = _refused(tmp_path, tmp_path / "src")
  assert "<|audio_7|>" in message


def test_glm4_voice_9b_config_is_what_from_hf_derives_from_glm_4_voice_9b():
  """configs/glm4_voice_9b.py == what from-hf takes from glm-4-voice-9b's config.json keys and
  its tokenizer's ids (GLM-4's specials, <|audio_0|> at 152,353): nothing printed as changed."""
  from data_pipelines.vocabulary import adopt
  from sptlm import config as config_lib
  from sptlm.convert import chatglm, families
  raw = chatglm_config(
      num_layers=40, hidden_size=4096, ffn_hidden_size=13_696, kv_channels=128,
      num_attention_heads=32, multi_query_group_num=2, padded_vocab_size=168_960,
      layernorm_epsilon=3.90625e-08, rope_ratio=1, seq_length=8192, num_hidden_layers=40,
      vocab_size=168_960, eos_token_id=[151_329, 151_336, 151_338], pad_token_id=151_329)
  fields, rows, _ = chatglm.model_fields(raw, "config.json")
  ids = {"<|endoftext|>": 151_329, "<|system|>": 151_335, "<|user|>": 151_336,
         "<|assistant|>": 151_337, "<|observation|>": 151_338, "<|begin_of_audio|>": 151_343,
         "<|end_of_audio|>": 151_344}
  ids.update({tokenizer.speech_token(k): 152_353 + k for k in range(16_384)})
  layout = adopt(rows, ids, 168_737)
  cfg = config_lib.load(pathlib.Path(TINY).parent / "glm4_voice_9b.py")
  derived, derived_rows = families.derive(
      cfg, fields, rows, (), "glm-4-voice-9b",
      {"speech_size": layout.speech_size, "speech_offset": layout.speech_offset,
       "special_offset": layout.special_offset, "special_ids": tuple(sorted(layout.adopted))})
  assert not [str(r) for r in derived_rows if r.changed] and derived == cfg
  assert layout.size == 168_960 and families.for_model(cfg.model).name == "glm"
