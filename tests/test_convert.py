"""Conversion to and from Hugging Face transformers, checked against transformers itself.

JAX -> HF: a randomly initialised tiny model (GQA and MHA, tied and untied, each family's
options), saved sharded over 8 host devices, exported and run by transformers: logits agree to
1e-4 in float32. HF -> JAX -> HF: a model made by transformers from its own config class
imports with its text logits matching to 1e-4 and exports back bit-identical. The tokenizer
encodes like SentencePiece and round-trips mixed text and speech. Nothing is downloaded.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import grain
import jax
import numpy as np
import pytest
import sentencepiece as spm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors import safe_open  # noqa: E402

from sptlm import config as config_lib  # noqa: E402
from sptlm import sharding  # noqa: E402
from sptlm.convert import ConversionError, checkpoints, from_hf, safetensors_io  # noqa: E402
from sptlm.convert import to_hf, tokenizer, verify  # noqa: E402
from sptlm.convert import cli as convert_cli  # noqa: E402
from sptlm.train import checkpoint as checkpoint_lib  # noqa: E402
from sptlm.train import program as program_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
SP_MODEL = ROOT / "data_pipelines" / "assets" / "tiny_sp1024.model"
CORPUS = ROOT / "data_pipelines" / "assets" / "tinyshakespeare.txt"
ATOL = 1e-4
# The tiny config at 2 layers, saved sharded: fsdp=4 x tensor=2 over the 8 host CPU devices.
BASE = ["model.num_layers=2", "model.attention='reference'", "mesh.data=1", "mesh.fsdp=4",
        "mesh.tensor=2"]


def load_cfg(*overrides: str) -> config_lib.Config:
  return config_lib.load(TINY, [*BASE, *overrides])


def random_params(cfg: config_lib.Config, seed: int) -> dict[str, Any]:
  """Every parameter random and O(1) in effect: a swapped or mis-rotated tensor shows."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, s in checkpoints.flatten(checkpoints.abstract_params(cfg)).items():
    if path[-1] == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(s.shape)
    elif path[-1].endswith("bias"):
      value = 0.1 * rng.standard_normal(s.shape)
    else:
      value = 0.1 * rng.standard_normal(s.shape)
    out[path] = value.astype(s.dtype)
  return checkpoints.unflatten(out)


def write_run(workdir: pathlib.Path, cfg: config_lib.Config, params: dict[str, Any],
              step: int = 7) -> None:
  """A workdir as `sptlm train` leaves it: config.json and a sharded Orbax checkpoint."""
  mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                             "tensor": cfg.mesh.tensor})
  program = program_lib.build(cfg, mesh)
  # Zeros where the trainer would init (no init compile); the shardings are the trainer's.
  state = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding),
                       program.abstract_state)
  state = dict(state, params=jax.device_put(params, program.state_sharding["params"]))
  assert len(state["params"]["layers"]["attn"]["q"].sharding.device_set) == 8
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config_lib.to_json(cfg))
  ckpt = checkpoint_lib.Checkpointer(str(workdir), keep=2, async_save=False)
  ckpt.save(step, state, iter(grain.MapDataset.range(4).to_iter_dataset()),
            config_lib.to_json(cfg))
  ckpt.wait()
  ckpt.close()


def load_hf(path: pathlib.Path) -> Any:
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(path), dtype=torch.float32, attn_implementation="eager").eval()


def sp_encode(text: str) -> list[int]:
  return spm.SentencePieceProcessor(model_file=str(SP_MODEL)).encode(text)


def safetensors_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  out = {}
  for file in sorted(path.glob("*.safetensors")):
    with safe_open(str(file), framework="numpy") as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


# ---------------------------------------------------------------------------------------------
# JAX -> HF

TO_HF_CASES = {
    # name: (overrides, transformers class)
    "llama-gqa-tied": ([], "LlamaForCausalLM"),
    "llama-mha-untied": (["model.num_kv_heads=4", "model.tie_embeddings=False"],
                         "LlamaForCausalLM"),
    "qwen2-gqa-untied": (["model.qkv_bias=True", "model.rope_theta=1e6",
                          "model.tie_embeddings=False", "model.norm_eps=1e-6"],
                         "Qwen2ForCausalLM"),
    "glm-gqa-untied": (["model.qkv_bias=True", "model.rope_style='interleaved'",
                        "model.rope_fraction=0.5", "model.tie_embeddings=False",
                        "model.norm_eps=1.5625e-7"], "GlmForCausalLM"),
    "glm-nobias-tied": (["model.rope_style='interleaved'", "model.rope_fraction=0.5"],
                        "GlmForCausalLM"),
}


@pytest.mark.parametrize("case", list(TO_HF_CASES))
def test_to_hf_logits_match_transformers(tmp_path, case):
  overrides, cls = TO_HF_CASES[case]
  cfg = load_cfg(*overrides)
  params = random_params(cfg, seed=1)
  write_run(tmp_path / "run", cfg, params)
  shard = "200KB" if case == "glm-gqa-untied" else "5GB"  # several shards + index here
  report = to_hf.export(str(tmp_path / "run"), str(tmp_path / "hf"),
                        max_shard_bytes=safetensors_io.parse_size(shard))
  assert report.architecture == cls and report.step == 7
  if case == "glm-gqa-untied":
    assert len(report.files) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").exists()

  model = load_hf(tmp_path / "hf")
  assert type(model).__name__ == cls
  vocab = program_lib.vocabulary(cfg)
  assert model.config.vocab_size == vocab.size
  assert (model.config.tie_word_embeddings) == cfg.model.tie_embeddings
  ours = verify.forward_fn(cfg, params)
  for kind, tokens in verify.inputs(cfg, sp_encode).items():
    theirs = verify.hf_logits(model, tokens)
    mine = ours(tokens)
    assert theirs.std() > 0.5, "logits too flat for the tolerance to mean anything"
    np.testing.assert_allclose(theirs, mine, rtol=0, atol=ATOL, err_msg=f"{case} {kind}")


def test_to_hf_bfloat16_is_the_rounded_float32(tmp_path):
  cfg = load_cfg()
  params = random_params(cfg, seed=2)
  write_run(tmp_path / "run", cfg, params)
  to_hf.export(str(tmp_path / "run"), str(tmp_path / "f32"))
  to_hf.export(str(tmp_path / "run"), str(tmp_path / "bf16"), dtype="bfloat16")
  f32, bf16 = safetensors_dict(tmp_path / "f32"), safetensors_dict(tmp_path / "bf16")
  assert set(f32) == set(bf16) and "lm_head.weight" not in f32  # tied
  for name, a in f32.items():
    assert bf16[name].dtype.name == "bfloat16"
    np.testing.assert_array_equal(bf16[name].view(np.uint16),
                                  torch.from_numpy(a).to(torch.bfloat16).view(torch.int16)
                                  .numpy().view(np.uint16), err_msg=name)
  config = json.loads((tmp_path / "bf16" / "config.json").read_text())
  assert config["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------
# HF -> JAX -> HF

def hf_model(family: str, dtype: torch.dtype) -> Any:
  """A small model made by transformers from its own config class, every tensor random."""
  common = dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32)
  if family == "llama":
    hf_cfg = transformers.LlamaConfig(**common, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                      rope_parameters={"rope_type": "default",
                                                       "rope_theta": 10000.0})
  elif family == "qwen2":
    hf_cfg = transformers.Qwen2Config(**common, rms_norm_eps=1e-6,
                                      rope_parameters={"rope_type": "default",
                                                       "rope_theta": 1e6})
  else:
    hf_cfg = transformers.GlmConfig(**common, rms_norm_eps=1.5625e-7, pad_token_id=0,
                                    rope_parameters={"rope_type": "default",
                                                     "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.5})
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p))
  return model.to(dtype).eval()


# What from-hf derives from each family's hf_model() where configs/tiny.py (at 2 layers) differs.
DERIVED_CHANGES = {
    "llama": set(),
    "qwen2": {"model.qkv_bias: False -> True", "model.rope_theta: 10000.0 -> 1000000.0",
              "model.tie_embeddings: True -> False", "model.norm_eps: 1e-05 -> 1e-06"},
    "glm": {"model.qkv_bias: False -> True", "model.rope_fraction: 1.0 -> 0.5",
            "model.rope_style: 'rotate_half' -> 'interleaved'",
            "model.tie_embeddings: True -> False", "model.norm_eps: 1e-05 -> 1.5625e-07"},
}


def import_hf(src: pathlib.Path, cfg: config_lib.Config, out: pathlib.Path) -> config_lib.Config:
  """from-hf as the CLI runs it; returns the derived config the checkpoint was written with."""
  derivation = from_hf.derive(str(src), cfg)
  from_hf.import_(derivation, str(out))
  return derivation.config


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("qwen2", "float32"),
                                          ("glm", "float32"), ("glm", "bfloat16")])
def test_from_hf_matches_transformers_and_round_trips_exactly(tmp_path, family, dtype):
  source = hf_model(family, getattr(torch, dtype))
  source.save_pretrained(str(tmp_path / "src"))
  derivation = from_hf.derive(str(tmp_path / "src"), load_cfg())  # the tiny config's model
  assert {str(r) for r in derivation.rows if r.changed} == DERIVED_CHANGES[family]
  cfg = derivation.config
  from_hf.import_(derivation, str(tmp_path / "imported"))

  # Text logits of the import == transformers' (the model in float32 either way).
  _, ours = verify.sptlm_logits_fn(str(tmp_path / "imported"))
  tokens = verify.inputs(cfg, sp_encode)["text"]
  theirs = verify.hf_logits(load_hf(tmp_path / "src"), tokens)  # float32 from the files
  assert theirs.std() > 0.5
  np.testing.assert_allclose(theirs, ours(tokens)[..., :1024], rtol=0, atol=ATOL)

  # Back to Hugging Face: the same class, every tensor bit-identical (text rows of the vocab).
  report = to_hf.export(str(tmp_path / "imported"), str(tmp_path / "back"), dtype=dtype)
  assert report.architecture == type(source).__name__
  before, after = safetensors_dict(tmp_path / "src"), safetensors_dict(tmp_path / "back")
  assert set(before) == set(after)
  for name, a in before.items():
    b = after[name]
    assert b.dtype == a.dtype, name
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
      assert b.shape == (program_lib.vocabulary(cfg).size, a.shape[1])
      b = b[:a.shape[0]]
    assert a.tobytes() == b.tobytes(), name
  back_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
  assert back_cfg["model_type"] == family


def test_from_hf_checkpoint_loads_as_init_from_and_new_rows_sit_at_the_mean(tmp_path):
  source = hf_model("qwen2", torch.float32)
  source.save_pretrained(str(tmp_path / "src"))
  derived = import_hf(tmp_path / "src", load_cfg(), tmp_path / "init")

  # Exactly what the trainer does with train.init_from, run from the written OUT/config.py.
  cfg = config_lib.load(tmp_path / "init" / "config.py", ["mesh.fsdp=1", "mesh.tensor=1"])
  assert cfg.train.init_from == str(tmp_path / "init")
  assert cfg.model == derived.model and cfg.vocab == derived.vocab and cfg.data == derived.data
  assert config_lib.from_json((tmp_path / "init" / "config.json").read_text()) == derived
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  program = program_lib.build(cfg, mesh)
  src = checkpoint_lib.Checkpointer(str(tmp_path / "init"), keep=2, async_save=False)
  state = src.restore_state(src.latest_step(), program.abstract_state)
  embed = np.asarray(state["params"]["embed"])
  head = np.asarray(state["params"]["lm_head"])
  hf_embed = source.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(embed[:1024], hf_embed)
  np.testing.assert_array_equal(head[:, :1024], source.lm_head.weight.detach().numpy().T)
  for new, text in ((embed[1024:], embed[:1024]), (head[:, 1024:].T, head[:, :1024].T)):
    mean = text.astype(np.float64).mean(axis=0)
    spread = text.std(axis=0).max()
    assert np.abs(new - mean).max() < 1e-3 * spread  # 1e-9 covariance: std ~3e-5 x spread
    assert len(np.unique(new[:, 0])) > 1  # the perturbation makes the rows distinct
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state["opt_state"]))
  record = json.loads((tmp_path / "init" / "hf_source" / "conversion.json").read_text())
  assert record["family"] == "qwen2" and record["text_size"] == 1024


def test_import_keeps_the_source_tokenizer_for_the_way_back(tmp_path):
  """A source with its own tokenizer (and its own <|user|>) exports with that tokenizer."""
  from tokenizers import AddedToken
  source = hf_model("llama", torch.float32)
  source.resize_token_embeddings(1040, mean_resizing=False)
  source.save_pretrained(str(tmp_path / "src"))
  src_tok = tokenizer.from_sentencepiece(SP_MODEL)
  src_tok.add_tokens([AddedToken("<|user|>", special=True, normalized=False)],
                     special_tokens=True)
  src_tok.save_pretrained(str(tmp_path / "src"))
  cfg = import_hf(tmp_path / "src", load_cfg(), tmp_path / "imported")
  assert cfg.vocab.text_size == 1040
  to_hf.export(str(tmp_path / "imported"), str(tmp_path / "back"))

  vocab = program_lib.vocabulary(cfg)
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
  assert auto.convert_tokens_to_ids("<|user|>") == 1024  # the source's own, untouched
  assert auto.convert_tokens_to_ids("<|sptlm_user|>") == vocab.special_id("<|user|>")
  assert auto.convert_tokens_to_ids("<|audio_0|>") == vocab.speech_start == 1040
  assert auto("Speak, speak.")["input_ids"] == sp_encode("Speak, speak.")
  rows = verify.compare(str(tmp_path / "imported"), str(tmp_path / "src"))
  assert [r.kind for r in rows] == ["text"] and rows[0].max_abs_diff < ATOL
  rows = verify.compare(str(tmp_path / "imported"), str(tmp_path / "back"))
  assert [r.kind for r in rows] == ["text", "speech", "mixed"]
  assert max(r.max_abs_diff for r in rows) < ATOL


# ---------------------------------------------------------------------------------------------
# Tokenizer

def test_tokenizer_encodes_like_sentencepiece_and_round_trips_speech(tmp_path):
  cfg = load_cfg()
  vocab = program_lib.vocabulary(cfg)
  tok, _ = tokenizer.build(cfg, None)
  tok.save_pretrained(str(tmp_path))
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  sp = spm.SentencePieceProcessor(model_file=str(SP_MODEL))
  assert len(auto) == vocab.special_start + len(vocab.specials)

  lines = CORPUS.read_text().splitlines()[:2000] + [
      "héllo wörld ☃ 日本語 12345", "  two  spaces  ", "tab\there", "new\nline", ""]
  for line in lines:
    ids = sp.encode(line)
    assert auto(line)["input_ids"] == ids, line
    assert auto.decode(ids) == sp.decode(ids), line

  # Mixed: each text stretch encodes as SentencePiece encodes it alone; speech and specials
  # are single added tokens at their sptlm ids.
  segments: list[Any] = ["First Citizen:", [3, 17, 511], "Speak, speak.", "<|end_of_audio|>",
                         " 42 ", [0]]
  text, ids = "", []
  for seg in segments:
    if isinstance(seg, list):
      text += "".join(tokenizer.speech_token(c) for c in seg)
      ids += [int(i) for i in vocab.speech_id(np.asarray(seg))]
    elif seg in vocab.specials:
      text += seg
      ids.append(vocab.special_id(seg))
    else:
      text += seg
      ids += sp.encode(seg)
  assert auto(text)["input_ids"] == ids
  assert auto(auto.decode(ids))["input_ids"] == ids
  assert auto.convert_ids_to_tokens(vocab.speech_start + 511) == "<|audio_511|>"
  for name in vocab.specials:
    assert auto.convert_tokens_to_ids(name) == vocab.special_id(name)
  kept = auto.decode(ids, skip_special_tokens=True)
  assert "<|audio_17|>" in kept and "<|end_of_audio|>" not in kept


# ---------------------------------------------------------------------------------------------
# Command line and errors

def _parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="sptlm")
  convert_cli.add_parser(parser.add_subparsers(dest="command", required=True))
  return parser.parse_args(argv)


def test_cli_verify_prints_the_three_measures(tmp_path, capsys):
  cfg = load_cfg("model.tie_embeddings=False")
  write_run(tmp_path / "run", cfg, random_params(cfg, seed=3))
  args = _parse(["convert", "to-hf", "--workdir", str(tmp_path / "run"), "--out",
                 str(tmp_path / "hf")])
  assert args.func(args, []) == 0
  args = _parse(["convert", "verify", "--workdir", str(tmp_path / "run"), "--hf",
                 str(tmp_path / "hf"), "--atol", str(ATOL)])
  assert args.func(args, []) == 0
  out = capsys.readouterr().out
  assert "max |dlogit|" in out and "mean KL" in out and "top-1 agree" in out
  rows = {line.split()[0]: line.split() for line in out.splitlines()[-3:]}
  assert set(rows) == {"text", "speech", "mixed"}
  for row in rows.values():
    assert float(row[2]) < ATOL and float(row[3]) < 1e-9 and float(row[4]) == 1.0


def test_cli_from_hf_derives_the_model_and_prints_what_changed(tmp_path, capsys, monkeypatch):
  """configs/tiny.py unchanged: every shape key comes from the Hugging Face model."""
  hf_cfg = transformers.LlamaConfig(
      vocab_size=1100, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
      num_attention_heads=6, num_key_value_heads=3, head_dim=16, rms_norm_eps=1e-6,
      tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
  torch.manual_seed(1)
  source = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
  source.save_pretrained(str(tmp_path / "src"))
  monkeypatch.chdir(tmp_path)  # a relative --out, as in the README
  args = _parse(["convert", "from-hf", "--hf", "src", "--config", str(TINY), "--out", "out"])
  # An explicit override that agrees with the model is fine; the others are file values.
  assert args.func(args, ["--config.model.d_model=96", "--config.train.seed=3"]) == 0
  lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
  assert lines[2:15] == [
      "model.num_layers: 4 -> 3", "model.d_model: 96", "model.num_heads: 4 -> 6",
      "model.num_kv_heads: 2 -> 3", "model.head_dim: 32 -> 16", "model.d_ff: 384 -> 256",
      "model.rope_theta: 10000.0 -> 500000.0", "model.rope_fraction: 1.0",
      "model.rope_style: 'rotate_half'", "model.qkv_bias: False",
      "model.tie_embeddings: True -> False", "model.norm_eps: 1e-05 -> 1e-06",
      "vocab.text_size: 1024 -> 1100"]
  assert lines[-1] == "use it     sptlm train --config out/config.py --workdir runs/tiny"

  # The checkpoint holds the Hugging Face shapes, and its config.json and config.py say so.
  reader = checkpoints.ParamReader(str(tmp_path / "out"))
  hf = {name: a.shape for name, a in safetensors_dict(tmp_path / "src").items()}
  assert reader.shapes[("layers", "attn", "q")][0] == (3, 96, 6, 16)
  assert reader.shapes[("layers", "attn", "k")][0] == (3, 96, 3, 16)
  assert reader.shapes[("layers", "mlp", "up")][0] == (
      3, *hf["model.layers.0.mlp.up_proj.weight"][::-1])
  assert reader.shapes[("lm_head",)][0][0] == 96
  written = checkpoints.read_config(str(tmp_path / "out"))
  checkpoints.check_shapes(written, reader.shapes, "out")
  reader.close()
  assert (written.model.num_layers, written.vocab.text_size, written.train.seed,
          written.model.dtype) == (3, 1100, 3, "float32")  # dtype, seed: the --config run's
  run = config_lib.load(tmp_path / "out" / "config.py")
  assert run.model == written.model and run.train.init_from == str(tmp_path / "out")
  rows = verify.compare(str(tmp_path / "out"), str(tmp_path / "src"))
  assert [r.kind for r in rows] == ["text"] and rows[0].max_abs_diff < ATOL


def test_from_hf_refuses_an_explicit_override_the_model_contradicts(tmp_path):
  hf_model("llama", torch.float32).save_pretrained(str(tmp_path / "src"))
  args = _parse(["convert", "from-hf", "--hf", str(tmp_path / "src"), "--config", str(TINY),
                 "--out", str(tmp_path / "out")])
  with pytest.raises(ConversionError) as e:
    args.func(args, ["--config.model.num_layers=7"])  # the model has 2
  message = str(e.value)
  assert "\n" not in message and "model.num_layers=7" in message and "has 2" in message
  with pytest.raises(ConversionError, match=r"vocab.text_size=2048 .* has 1024"):
    args.func(args, ["--config.vocab.text_size=2048"])
  assert not (tmp_path / "out").exists()


def test_unsupported_models_are_refused_clearly(tmp_path):
  cfg = load_cfg()
  glm4 = transformers.Glm4Config(vocab_size=1024, hidden_size=128, intermediate_size=384,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=32)
  glm4.save_pretrained(str(tmp_path / "glm4"))
  with pytest.raises(ConversionError, match="glm4.*norms after each sub-layer"):
    import_hf(tmp_path / "glm4", cfg, tmp_path / "out")

  llama3 = transformers.LlamaConfig(
      vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
      rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192})
  llama3.save_pretrained(str(tmp_path / "llama3"))
  with pytest.raises(ConversionError, match="rope_type='llama3'"):
    import_hf(tmp_path / "llama3", cfg, tmp_path / "out")

  # Pickle checkpoints are never opened.
  pickled = tmp_path / "pickled"
  hf_model("llama", torch.float32).config.save_pretrained(str(pickled))
  (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(ConversionError, match="pickle files are never loaded"):
    import_hf(pickled, cfg, tmp_path / "out")

  # A model no standard class computes exactly.
  partial = dataclasses.replace(cfg.model, rope_fraction=0.5)
  with pytest.raises(ConversionError, match="no standard Hugging Face class"):
    from sptlm.convert import families
    families.for_model(partial)


def test_glm4_9b_config_is_transformers_glm_4_9b():
  """configs/glm4_9b.py is the math of GlmConfig()'s defaults (THUDM/glm-4-9b-chat-hf)."""
  from sptlm.convert import families
  fam, fields, text_size = families.from_hf_config(transformers.GlmConfig())
  cfg = config_lib.load(ROOT / "configs" / "glm4_9b.py")
  derived, rows = families.derive(cfg, fields, text_size, (), "GlmConfig()")
  assert derived == cfg and not [str(r) for r in rows if r.changed]
  assert fam.architecture == "GlmForCausalLM"
  assert families.for_model(cfg.model).name == "glm"


def test_cli_is_wired_into_sptlm(tmp_path, capsys):
  from sptlm import cli
  assert cli.main(["convert", "to-hf", "--workdir", str(tmp_path / "missing"), "--out",
                   str(tmp_path / "hf")]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "config.json not found" in err


@pytest.mark.slow
def test_sptlm_train_starts_from_an_import_and_exports_back(tmp_path):
  """from-hf -> `sptlm train --config OUT/config.py` (the real entry points) -> to-hf -> verify."""
  hf_model("llama", torch.float32).save_pretrained(str(tmp_path / "src"))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(
      [sys.executable, "-m", "sptlm.cli", "convert", "from-hf", "--hf", str(tmp_path / "src"),
       "--config", str(TINY), "--out", str(tmp_path / "init")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "model.num_layers: 4 -> 2" in proc.stdout
  proc = subprocess.run(
      [sys.executable, "-m", "sptlm.cli", "train", "--config", str(tmp_path / "init" / "config.py"),
       "--workdir", str(tmp_path / "run"), "--config.train.steps=2",
       "--config.train.warmup_steps=1", "--config.data.seq_len=32",
       "--config.data.global_batch_size=4"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = to_hf.export(str(tmp_path / "run"), str(tmp_path / "hf"))
  assert report.architecture == "LlamaForCausalLM" and report.step == 2
  rows = verify.compare(str(tmp_path / "run"), str(tmp_path / "hf"))
  assert max(r.max_abs_diff for r in rows) < ATOL
