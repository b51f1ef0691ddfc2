"""`sptlm eval` on a Hugging Face folder made by `sptlm convert to-hf`: the same model as the run.

A tiny run with random O(1) parameters (test_convert's helpers: saved sharded over 8 host
devices) is exported, then LanguageModel.load reads both the run and the folder: the
continuation NLLs agree to 1e-5, and so do the vocabulary, the model's math keys and the text
tokenizer. A folder with a tensor missing, extra or misshapen, an unreadable config.json or no
tokenizer.json is refused in one line that names it, and nothing is written.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402
from test_convert import CORPUS, TO_HF_CASES, load_cfg, random_params, write_run  # noqa: E402

from sptlm.convert import families, to_hf  # noqa: E402
from sptlm.errors import UserError  # noqa: E402
from sptlm.eval import hf_model  # noqa: E402
from sptlm.eval.lm import LanguageModel  # noqa: E402

TOL = 1e-5
STEP = 7  # write_run's


def export(root: pathlib.Path, case: str, dtype: str = "float32") -> tuple[str, str]:
  """(run, Hugging Face folder) of one of test_convert's to-hf cases."""
  cfg = load_cfg(*TO_HF_CASES[case][0])
  write_run(root / "run", cfg, random_params(cfg, seed=3), step=STEP)
  to_hf.export(str(root / "run"), str(root / "hf"), dtype=dtype)
  return str(root / "run"), str(root / "hf")


def pairs(tok) -> list[tuple[list[int], list[int]]]:
  """(context, continuation) ids from the corpus, of mixed lengths (two length buckets)."""
  lines = [line for line in CORPUS.read_text().splitlines() if line.strip()][:40]
  out = []
  for k in range(6):
    context = " ".join(lines[k:k + 1 + 3 * (k % 3)])
    out.append((tok.encode(context), tok.encode(" " + lines[k + 10])))
  return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[str, str]:
  return export(tmp_path_factory.mktemp("llama"), "llama-gqa-tied")


@pytest.mark.parametrize("case", ["llama-gqa-tied", "qwen2-gqa-untied", "glm-gqa-untied"])
def test_hf_folder_scores_like_the_run(tmp_path, case):
  run, hf = export(tmp_path, case)
  ours, theirs = LanguageModel.load(run), LanguageModel.load(hf)
  assert (ours.step, theirs.step) == (STEP, 0)  # to-hf records no step
  assert theirs.source == hf
  for key in families.ARCH_KEYS:
    assert getattr(theirs.cfg.model, key) == getattr(ours.cfg.model, key), key
  assert theirs.cfg.model.dtype == "float32"
  assert theirs.cfg.data.seq_len == ours.cfg.data.seq_len
  assert (theirs.vocab.text_size, theirs.vocab.speech_size, theirs.vocab.size) == (
      ours.vocab.text_size, ours.vocab.speech_size, ours.vocab.size)
  for name in ours.vocab.specials:
    assert theirs.vocab.special_id(name) == ours.vocab.special_id(name)

  examples = pairs(ours.tokenizer)
  assert pairs(theirs.tokenizer) == examples  # the text tokenizer encodes alike
  assert theirs.tokenizer.size() == ours.tokenizer.size()
  assert theirs.tokenizer.eos_id() == ours.tokenizer.eos_id()
  # Text that spells a speech token stays text, as in the run's SentencePiece tokenizer.
  assert theirs.tokenizer.encode("<|audio_3|>") == ours.tokenizer.encode("<|audio_3|>")

  want = ours.continuation_nlls(examples, batch=4)
  got = theirs.continuation_nlls(examples, batch=4)
  assert np.concatenate(want).std() > 0.1, "NLLs too flat for the tolerance to mean anything"
  for k, (w, g) in enumerate(zip(want, got)):
    np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL, err_msg=f"{case} pair {k}")


def test_bfloat16_folder_runs_in_bfloat16_with_the_rounded_weights(tmp_path):
  import ml_dtypes
  from flax import nnx
  run, hf = export(tmp_path, "llama-gqa-tied", dtype="bfloat16")
  ours, theirs = LanguageModel.load(run), LanguageModel.load(hf)
  assert (theirs.cfg.model.dtype, theirs.cfg.model.param_dtype) == ("bfloat16", "float32")
  embed = [np.asarray(nnx.split(lm.model, nnx.Param)[1].to_pure_dict()["embed"])
           for lm in (ours, theirs)]
  assert embed[1].dtype == np.float32
  np.testing.assert_array_equal(embed[1], embed[0].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_is_hf_folder_tells_an_export_from_a_run(llama, tmp_path):
  run, hf = llama
  assert hf_model.is_hf_folder(hf) and not hf_model.is_hf_folder(run)
  assert not hf_model.is_hf_folder(tmp_path)  # no config.json
  broken = tmp_path / "broken"
  shutil.copytree(hf, broken)
  (broken / "config.json").write_text("{not json")
  assert hf_model.is_hf_folder(broken)  # weights beside it: load names the broken file


def _without(names: list[str]):
  def change(folder: pathlib.Path) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k not in names},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
  return change


def _with(name: str, shape: tuple[int, ...]):
  def change(folder: pathlib.Path) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    tensors[name] = np.zeros(shape, np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  return change


def _config(edit):
  def change(folder: pathlib.Path) -> None:
    path = folder / "config.json"
    path.write_text(edit(path.read_text()))
  return change


def _drop_speech_tokens(folder: pathlib.Path) -> None:
  spec = json.loads((folder / "tokenizer.json").read_text())
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < 1024]
  (folder / "tokenizer.json").write_text(json.dumps(spec))


BAD = {
    # case: (change to a copy of the export, error type, text the one line must hold)
    "missing tensor": (_without(["model.norm.weight"]), UserError, "'model.norm.weight'"),
    "extra tensor": (_with("model.layers.5.mlp.up_proj.weight", (384, 128)), UserError,
                     "'model.layers.5.mlp.up_proj.weight'"),
    "misshapen tensor": (_with("model.norm.weight", (1,)), UserError, "'model.norm.weight'"),
    "unreadable config": (_config(lambda text: text[:40]), UserError, "config.json"),
    "config of another vocabulary": (
        _config(lambda text: text.replace('"vocab_size": 2176', '"vocab_size": 2304')),
        UserError, "vocab_size=2304"),
    "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(), FileNotFoundError,
                     "tokenizer.json"),
    "tokenizer without sptlm tokens": (_drop_speech_tokens, UserError, "<|begin_of_audio|>"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folder_is_refused_in_one_line_naming_it(llama, tmp_path, case):
  change, error, named = BAD[case]
  folder = tmp_path / "hf"
  shutil.copytree(llama[1], folder)
  change(folder)
  before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
  with pytest.raises(error) as info:
    LanguageModel.load(str(folder))
  assert isinstance(info.value, UserError)
  message = str(info.value)
  assert named in message and "\n" not in message, message
  assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # nothing written
