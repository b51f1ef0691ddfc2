"""The original ChatGLM layout (glm-4-9b, glm-4-voice-9b) imported by from-hf, exported as GLM.

Each test writes a small random model the way those folders hold it: config.json in ChatGLM's
keys, fused query_key_value and dense_h_to_4h tensors under transformer.* names, sharded
safetensors with model.safetensors.index.json, and a tokenizer. Two independent checks of the
import: sptlm's logits equal a float64 numpy forward of the ChatGLM math run on the fused
tensors as written (so a wrong split, rotary or scale shows), and the `to-hf` export, run by
transformers' GlmForCausalLM, equals sptlm's logits on text, speech and mixed inputs. Bad
input ends in one line naming the key, tensor or dtype, with nothing written.
"""

import json
import pathlib
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.numpy import save_file  # noqa: E402

from sptlm.convert import ConversionError, from_hf, to_hf, tokenizer, verify  # noqa: E402
from test_convert import ATOL, SP_MODEL, TINY, _parse, load_cfg, load_hf  # noqa: E402
from test_convert import safetensors_dict, sp_encode  # noqa: E402

VOCAB = 1024  # padded_vocab_size: the SentencePiece model's ids


def chatglm_config(**changes: Any) -> dict[str, Any]:
  """A config.json in ChatGLM's keys (GLM-4-9B's shape, shrunk), rope_ratio not 1."""
  raw = {
      "architectures": ["ChatGLMModel"], "model_type": "chatglm",
      "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                   "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
      "num_layers": 2, "hidden_size": 96, "ffn_hidden_size": 160, "kv_channels": 32,
      "num_attention_heads": 4, "multi_query_attention": True, "multi_query_group_num": 2,
      "padded_vocab_size": VOCAB, "seq_length": 256, "layernorm_epsilon": 1.5625e-07,
      "rmsnorm": True, "add_qkv_bias": True, "add_bias_linear": False, "rope_ratio": 3,
      "original_rope": True, "post_layer_norm": True,
      "apply_residual_connection_post_layernorm": False, "apply_query_key_layer_scaling": True,
      "attention_softmax_in_fp32": True, "fp32_residual_connection": False,
      "hidden_dropout": 0.0, "attention_dropout": 0.0, "classifier_dropout": None,
      "tie_word_embeddings": False, "eos_token_id": [2, 3], "pad_token_id": 0,
      "torch_dtype": "bfloat16", "transformers_version": "4.44.0",
  }
  raw.update(changes)
  return raw


def _layer(i: int, name: str) -> str:
  return f"transformer.encoder.layers.{i}.{name}"


def chatglm_tensors(raw: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
  """Every tensor random and O(1) in effect, named and fused as the ChatGLM code holds them."""
  rng = np.random.default_rng(seed)
  d, f, dh = raw["hidden_size"], raw["ffn_hidden_size"], raw["kv_channels"]
  h = raw["num_attention_heads"]
  k = raw["multi_query_group_num"] if raw["multi_query_attention"] else h
  fused = (h + 2 * k) * dh

  def w(*shape: int, scale: float = 0.1, center: float = 0.0) -> np.ndarray:
    return (center + scale * rng.standard_normal(shape)).astype(np.float32)

  out = {"transformer.embedding.word_embeddings.weight": w(VOCAB, d, scale=1.0),
         "transformer.rotary_pos_emb.inv_freq": (
             1.0 / 10000 ** (np.arange(0, dh // 2, 2) / (dh // 2))).astype(np.float32),
         "transformer.encoder.final_layernorm.weight": w(d, center=1.0),
         "transformer.output_layer.weight": w(VOCAB, d)}
  for i in range(raw["num_layers"]):
    out[_layer(i, "input_layernorm.weight")] = w(d, center=1.0)
    out[_layer(i, "self_attention.query_key_value.weight")] = w(fused, d)
    if raw["add_qkv_bias"]:
      out[_layer(i, "self_attention.query_key_value.bias")] = w(fused)
    out[_layer(i, "self_attention.dense.weight")] = w(d, h * dh)
    out[_layer(i, "post_attention_layernorm.weight")] = w(d, center=1.0)
    out[_layer(i, "mlp.dense_h_to_4h.weight")] = w(2 * f, d)
    out[_layer(i, "mlp.dense_4h_to_h.weight")] = w(d, f)
  return out


def write_chatglm(folder: pathlib.Path, raw: dict[str, Any], tensors: dict[str, np.ndarray],
                  dtype: str = "float32") -> None:
  """config.json, two safetensors shards with their index, and a tokenizer.json folder."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(raw, indent=2))
  names = sorted(tensors)
  files = {"model-00001-of-00002.safetensors": names[::2],
           "model-00002-of-00002.safetensors": names[1::2]}
  weight_map = {}
  for file, part in files.items():
    arrays = {n: _cast(tensors[n], dtype) for n in part}
    save_file(arrays, str(folder / file), metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2))
  tokenizer.from_sentencepiece(SP_MODEL).save_pretrained(str(folder))


def _cast(a: np.ndarray, dtype: str) -> np.ndarray:
  import ml_dtypes
  if a.dtype.kind not in "fV":  # an integer (quantized) tensor stays what it is
    return a
  return a.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


def _widened(a: np.ndarray) -> np.ndarray:
  return a.astype(np.float64)


# ---------------------------------------------------------------------------------------------
# The ChatGLM math, written from the reference's description, on the fused tensors

def chatglm_logits(raw: dict[str, Any], t: dict[str, np.ndarray], ids: np.ndarray
                   ) -> np.ndarray:
  """ChatGLMForConditionalGeneration's logits [L, V] for one sequence, in float64 numpy."""
  t = {n: _widened(a) for n, a in t.items()}
  dh, h = raw["kv_channels"], raw["num_attention_heads"]
  mqa = raw["multi_query_attention"]
  k = raw["multi_query_group_num"] if mqa else h
  eps = raw["layernorm_epsilon"]
  length = len(ids)

  def rms(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)

  # Rotary table: kv_channels / 2 dims, base 10000 * rope_ratio, pairs (2i, 2i + 1).
  n_elem = dh // 2
  theta = 1.0 / (10000.0 * raw["rope_ratio"]) ** (np.arange(0, n_elem, 2) / n_elem)
  angle = np.outer(np.arange(length), theta)  # [L, n_elem / 2]
  cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]

  def rope(x: np.ndarray) -> np.ndarray:  # x [L, heads, Dh]
    rot, rest = x[..., :n_elem], x[..., n_elem:]
    pairs = rot.reshape(*rot.shape[:-1], n_elem // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = np.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return np.concatenate([out.reshape(rot.shape), rest], axis=-1)

  x = t["transformer.embedding.word_embeddings.weight"][ids]  # [L, D]
  causal = np.tril(np.ones((length, length), bool))
  for i in range(raw["num_layers"]):
    y = rms(x, t[_layer(i, "input_layernorm.weight")])
    mixed = y @ t[_layer(i, "self_attention.query_key_value.weight")].T
    if raw["add_qkv_bias"]:
      mixed = mixed + t[_layer(i, "self_attention.query_key_value.bias")]
    if mqa:
      q = mixed[:, :h * dh].reshape(length, h, dh)
      kk = mixed[:, h * dh:(h + k) * dh].reshape(length, k, dh)
      v = mixed[:, (h + k) * dh:].reshape(length, k, dh)
    else:  # the reference views the fused rows as [H, 3 * Dh] and splits each head in three
      per_head = mixed.reshape(length, h, 3 * dh)
      q, kk, v = per_head[..., :dh], per_head[..., dh:2 * dh], per_head[..., 2 * dh:]
    q, kk = rope(q), rope(kk)
    group = np.arange(h) // (h // k)  # query head -> its key/value group
    scores = np.einsum("qhd,khd->hqk", q, kk[:, group]) / np.sqrt(dh)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = np.einsum("hqk,khd->qhd", probs, v[:, group]).reshape(length, h * dh)
    x = x + context @ t[_layer(i, "self_attention.dense.weight")].T
    y = rms(x, t[_layer(i, "post_attention_layernorm.weight")])
    a, b = np.split(y @ t[_layer(i, "mlp.dense_h_to_4h.weight")].T, 2, axis=-1)
    x = x + (a / (1 + np.exp(-a)) * b) @ t[_layer(i, "mlp.dense_4h_to_h.weight")].T
  x = rms(x, t["transformer.encoder.final_layernorm.weight"])
  return x @ t["transformer.output_layer.weight"].T


def run_from_hf(src: pathlib.Path, out: pathlib.Path, *overrides: str) -> str:
  """`sptlm convert from-hf --hf SRC --config configs/tiny.py --out OUT` as the CLI runs it."""
  args = _parse(["convert", "from-hf", "--hf", str(src), "--config", str(TINY), "--out",
                 str(out)])
  assert args.func(args, list(overrides)) == 0
  return str(out)


# ---------------------------------------------------------------------------------------------
# Import, export, and the two checks

CASES = {
    # name: (config changes, safetensors dtype)
    "mqa-bias": ({}, "float32"),
    "mqa-bias-bf16": ({}, "bfloat16"),
    "mha-nobias": ({"multi_query_attention": False, "add_qkv_bias": False, "rope_ratio": 1},
                   "float32"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chatglm_imports_as_glm_and_exports_to_transformers(tmp_path, capsys, case):
  changes, dtype = CASES[case]
  raw = chatglm_config(**changes)
  tensors = chatglm_tensors(raw)
  write_chatglm(tmp_path / "src", raw, tensors, dtype)
  run_from_hf(tmp_path / "src", tmp_path / "imported")
  out = capsys.readouterr().out
  assert "GlmForCausalLM (ChatGLM layout)" in out
  kv = 2 if raw["multi_query_attention"] else 4
  for row in ("model.num_layers: 4 -> 2", "model.d_model: 128 -> 96", f"model.num_kv_heads: "
              f"2 -> {kv}" if kv != 2 else "model.num_kv_heads: 2", "model.head_dim: 32",
              "model.d_ff: 384 -> 160", "model.rope_fraction: 1.0 -> 0.5",
              "model.rope_style: 'rotate_half' -> 'interleaved'",
              "model.tie_embeddings: True -> False", "model.norm_eps: 1e-05 -> 1.5625e-07",
              "vocab.text_size: 1024"):
    assert row in out, row
  theta = 10000.0 * raw["rope_ratio"]
  assert (f"model.rope_theta: 10000.0 -> {theta}" if theta != 10000.0
          else "model.rope_theta: 10000.0") in out

  # 1. The import against the ChatGLM math on the fused tensors, as read back from the files.
  cfg, ours = verify.sptlm_logits_fn(str(tmp_path / "imported"))
  assert cfg.model.qkv_bias == raw["add_qkv_bias"] and cfg.model.rope_theta == theta
  written = safetensors_dict(tmp_path / "src")
  tokens = verify.inputs(cfg, sp_encode)["text"]
  reference = chatglm_logits(raw, written, tokens[0])
  assert reference.std() > 0.5, "logits too flat for the tolerance to mean anything"
  np.testing.assert_allclose(ours(tokens)[0, :, :VOCAB], reference, rtol=0, atol=ATOL)

  # 2. Exported as GLM, transformers' GlmForCausalLM computes what sptlm computes (float32:
  # a bfloat16 import widened exactly, and the new speech rows are not rounded).
  report = to_hf.export(str(tmp_path / "imported"), str(tmp_path / "hf"))
  assert report.architecture == "GlmForCausalLM"
  model = load_hf(tmp_path / "hf")
  assert type(model).__name__ == "GlmForCausalLM"
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["model_type"] == "glm" and config["partial_rotary_factor"] == 0.5
  assert config["rope_theta"] == theta and config["max_position_embeddings"] == 256
  assert config["eos_token_id"] == [2, 3] and "num_layers" not in config
  assert "auto_map" not in config
  rows = verify.compare(str(tmp_path / "imported"), str(tmp_path / "hf"))
  assert [r.kind for r in rows] == ["text", "speech", "mixed"]
  assert max(r.max_abs_diff for r in rows) < ATOL

  # The split itself, bit for bit: GLM's tensors are the fused ones cut apart.
  back = {n: _cast(a, dtype) for n, a in safetensors_dict(tmp_path / "hf").items()}
  for i in range(raw["num_layers"]):
    gate_up = back[f"model.layers.{i}.mlp.gate_up_proj.weight"]
    assert gate_up.tobytes() == written[_layer(i, "mlp.dense_h_to_4h.weight")].tobytes()
    qkv = np.concatenate([back[f"model.layers.{i}.self_attn.{x}_proj.weight"] for x in "qkv"])
    fused = written[_layer(i, "self_attention.query_key_value.weight")]
    if not raw["multi_query_attention"]:  # head by head q k v -> all q, all k, all v
      fused = fused.reshape(4, 3, 32, -1).transpose(1, 0, 2, 3).reshape(fused.shape)
    assert qkv.tobytes() == fused.tobytes()
  embed = back["model.embed_tokens.weight"][:VOCAB]
  assert embed.tobytes() == written["transformer.embedding.word_embeddings.weight"].tobytes()


def test_numpy_chatglm_reference_sees_a_wrong_split(tmp_path):
  """The reference forward is sensitive to what it checks: swapping gate and up changes it."""
  raw = chatglm_config()
  tensors = chatglm_tensors(raw)
  ids = np.asarray(sp_encode(verify.TEXT)[:40])
  good = chatglm_logits(raw, tensors, ids)
  swapped = dict(tensors)
  w = tensors[_layer(0, "mlp.dense_h_to_4h.weight")]
  swapped[_layer(0, "mlp.dense_h_to_4h.weight")] = np.concatenate(np.split(w, 2)[::-1])
  assert np.abs(chatglm_logits(raw, swapped, ids) - good).max() > 100 * ATOL
  plain_rope = chatglm_config(rope_ratio=1)
  assert np.abs(chatglm_logits(plain_rope, tensors, ids) - good).max() > 100 * ATOL


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, nothing written

def _refused(tmp_path: pathlib.Path, src: pathlib.Path) -> str:
  out = tmp_path / "out"
  with pytest.raises(ConversionError) as e:
    run_from_hf(src, out)
  assert not out.exists(), "nothing may be written"
  message = str(e.value)
  assert "\n" not in message
  return message


BAD_CONFIGS = {
    # config change: what the message must name
    "rmsnorm": ({"rmsnorm": False}, "rmsnorm=False"),
    "post-layernorm-residual": ({"apply_residual_connection_post_layernorm": True},
                                "apply_residual_connection_post_layernorm=True"),
    "linear-bias": ({"add_bias_linear": True}, "add_bias_linear=True"),
    "no-final-norm": ({"post_layer_norm": False}, "post_layer_norm=False"),
    "quantized": ({"quantization_bit": 4}, "quantization_bit=4"),
    "prefix": ({"pre_seq_len": 8}, "pre_seq_len=8"),
    "odd-rotary": ({"kv_channels": 30}, "kv_channels=30"),
    "groups": ({"multi_query_group_num": 3}, "multi_query_group_num=3"),
    "no-layers": ({"num_layers": None}, "num_layers"),
    "wrong-type": ({"hidden_size": "96"}, "hidden_size='96'"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_configs_sptlm_cannot_represent_are_refused_naming_the_key(tmp_path, case):
  changes, named = BAD_CONFIGS[case]
  raw = chatglm_config(**changes)
  if raw["num_layers"] is None:
    del raw["num_layers"]
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "config.json").write_text(json.dumps(raw))
  message = _refused(tmp_path, tmp_path / "src")
  assert named in message and "config.json" in message


def test_bad_folders_and_tensors_are_refused_naming_them(tmp_path):
  # No config.json.
  (tmp_path / "empty").mkdir()
  assert "config.json not found" in _refused(tmp_path, tmp_path / "empty")

  raw = chatglm_config()
  good = chatglm_tensors(raw)

  def variant(name: str, tensors: dict[str, np.ndarray]) -> pathlib.Path:
    write_chatglm(tmp_path / name, raw, tensors)
    return tmp_path / name

  missing = dict(good)
  del missing[_layer(1, "mlp.dense_4h_to_h.weight")]
  message = _refused(tmp_path, variant("missing", missing))
  assert "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight" in message
  assert "missing" in message

  extra = dict(good, **{"transformer.prefix_encoder.embedding.weight": np.zeros((4, 8),
                                                                               np.float32)})
  message = _refused(tmp_path, variant("extra", extra))
  assert "transformer.prefix_encoder.embedding.weight" in message and "no place" in message

  wrong = dict(good)
  wrong[_layer(0, "self_attention.query_key_value.weight")] = np.zeros((100, 96), np.float32)
  message = _refused(tmp_path, variant("shape", wrong))
  assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in message
  assert "[100, 96]" in message and "[256, 96]" in message

  quantized = dict(good)
  quantized[_layer(0, "mlp.dense_4h_to_h.weight")] = np.zeros((96, 160), np.int8)
  message = _refused(tmp_path, variant("int8", quantized))
  assert "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight" in message
  assert "dtype I8" in message


def test_cli_prints_one_line_for_a_chatglm_it_cannot_represent(tmp_path, capsys):
  from sptlm import cli
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "config.json").write_text(json.dumps(chatglm_config(rmsnorm=False)))
  code = cli.main(["convert", "from-hf", "--hf", str(tmp_path / "src"), "--config", str(TINY),
                   "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err.strip()
  assert code == 1 and len(err.splitlines()) == 1 and "rmsnorm=False" in err
  assert not (tmp_path / "out").exists()


def test_tiny_config_is_untouched_by_an_import(tmp_path):
  """The --config run keeps everything but the model's shape (dtype, seed, data)."""
  raw = chatglm_config()
  write_chatglm(tmp_path / "src", raw, chatglm_tensors(raw))
  derivation = from_hf.derive(str(tmp_path / "src"), load_cfg("train.seed=5"))
  assert derivation.glm_source is not None and derivation.glm_source.multi_query
  cfg = derivation.config
  assert cfg.train.seed == 5 and cfg.model.dtype == "float32" and cfg.vocab.speech_size == 1024
