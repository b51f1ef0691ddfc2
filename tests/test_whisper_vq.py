"""Imported WhisperVQ tokenizers (GLM-4-Voice's layout): Whisper's features, parity with a
PyTorch model of the released architecture on real speech, the work directory through the CLI
and the Python API, sharded == one device, and one-line refusals of bad checkpoints.

The reference (tests/whisper_vq_reference.py) is built from transformers' Whisper encoder
layers plus the release's own pieces; its random weights are saved in the released key layout.
"""

import importlib.util
import json
import pathlib
import shutil
import subprocess

import jax
import numpy as np
import pytest

from sptlm import cli
from sptlm.speech import audio as audio_lib
from sptlm.speech.tokenizer import SpeechTokenizer
from sptlm.speech.whisper_vq import config as config_lib
from sptlm.speech.whisper_vq import features, importer, weights
from sptlm.speech.whisper_vq.tokenizer import WhisperVQTokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import whisper_vq_reference as ref  # noqa: E402  (tests/ is on sys.path under pytest)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (scripts/setup.sh)")

SENTENCES = (
    ("en", "The quick brown fox jumps over the lazy dog near the river bank."),
    ("en-us+f3", "She sells sea shells by the sea shore, and the shells she sells are surely "
                 "seashells."),
    ("en-gb-scotland+m3", "A journey of a thousand miles begins with a single step."),
    ("en+m2", "Peter Piper picked a peck of pickled peppers."),
    ("en-us", "How much wood would a woodchuck chuck if a woodchuck could chuck wood? " * 3),
)
VARIANTS = {  # GLM-4-Voice's switches, and the two other attention modes of the reference
    "glm": {},
    "bidirectional": {"encoder_causal_convolution": False, "quantize_causal_block_size": None,
                      "pooling_position": 2},
    "causal": {"encoder_causal_attention": True, "quantize_position": 3},
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[np.ndarray]:
  """Real speech at 16 kHz (espeak-ng at 22,050 Hz, resampled): five sentences of 2.6-11 s
  and one 36 s file (two 30 s windows, the second partial)."""
  if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (scripts/setup.sh)")
  tmp = tmp_path_factory.mktemp("speech")
  out = []
  for i, (voice, text) in enumerate(SENTENCES):
    path = tmp / f"clip{i}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    out.append(audio_lib.read(path).samples)
  return out + [np.concatenate(out + out[:3])]


@pytest.fixture(scope="module")
def reference(clips, tmp_path_factory) -> tuple[ref.ReferenceWhisperVQ, pathlib.Path]:
  """GLM-4-Voice's configuration at d_model 64: the model and its checkpoint folder."""
  model = ref.build(ref.small_config(), clips[-1])
  folder = tmp_path_factory.mktemp("glm_small")
  model.save(folder)
  return model, folder


# ---- Features ----------------------------------------------------------------------------------


@needs_espeak
def test_log_mel_equals_whisper_feature_extractor(clips):
  """features.log_mel == transformers' WhisperFeatureExtractor(feature_size=128), padded to
  whole tokens as the reference asks: its numpy path to 1e-6; its torch path (what runs when
  torch is installed, float32) to 1e-4, the float32 rounding of bins near the floor."""
  fe = transformers.WhisperFeatureExtractor(feature_size=128)
  silence_then_speech = np.concatenate([np.zeros(5000, np.float32), clips[2][:20000]])
  for x in [clips[0], clips[3][:1281], silence_then_speech, clips[-1][:features.WINDOW_SAMPLES]]:
    got = features.log_mel(x, 128)
    out = fe([x], sampling_rate=16000, return_attention_mask=True, padding="longest",
             pad_to_multiple_of=1280, return_tensors="np")
    want_torch = out["input_features"][0].T
    assert got.shape == want_torch.shape == (8 * -(-len(x) // 1280), 128)
    padded = np.zeros(features.padded_length(len(x)), np.float32)
    padded[:len(x)] = x
    want_numpy = fe._np_extract_fbank_features(padded[None], "cpu")[0].T
    np.testing.assert_allclose(got, want_numpy, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, want_torch, rtol=0, atol=1e-4)


def test_window_bounds_are_the_reference_cut():
  w = features.WINDOW_SAMPLES
  assert features.window_bounds(w) == [(0, w)]
  assert features.window_bounds(2 * w + 10) == [(0, w), (w, 2 * w), (2 * w, 2 * w + 10)]
  assert features.padded_length(1281) == 2560


# ---- Parity --------------------------------------------------------------------------------------


def _agreement_report(model, clips, got) -> tuple[float, float, list[str]]:
  """(token agreement, max |hidden difference|, one line per disagreeing token with the
  reference's distance gap between the two codes)."""
  total = same = 0
  worst = 0.0
  notes = []
  e = model.codebook.weight.detach().numpy().astype(np.float64)
  for c, x in enumerate(clips):
    ids, hidden = model.tokenize(x)
    codes, h = got[c]
    assert len(ids) == len(codes) == -(-len(x) // 1280)
    total += len(ids)
    same += int(np.sum(ids == codes))
    worst = max(worst, float(np.max(np.abs(hidden - h))))
    for i in np.flatnonzero(ids != codes):
      d = np.sum((e[[ids[i], codes[i]]] - hidden[i].astype(np.float64)) ** 2, axis=1)
      notes.append(f"clip {c} token {i}: reference {ids[i]}, sptlm {codes[i]}, "
                   f"distances {d[0]:.6g} vs {d[1]:.6g}")
  return same / total, worst, notes


@needs_espeak
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tokens_match_reference_on_real_speech(variant, clips, reference, tmp_path):
  """Token ids agree on >= 99.9% of frames (every one, so far) and the quantizer's inputs to
  1e-4, with each side computing its own features (transformers' extractor for the
  reference)."""
  if variant == "glm":
    model, folder = reference
    inputs = clips
  else:
    model = ref.build(ref.small_config(**VARIANTS[variant]), clips[-1])
    folder = tmp_path / "src"
    model.save(folder)
    inputs = clips[:-1]
  importer.import_checkpoint(folder, tmp_path / "out")
  tok = SpeechTokenizer.load(tmp_path / "out")
  assert isinstance(tok, WhisperVQTokenizer)
  agree, worst, notes = _agreement_report(model, inputs, tok.encode_with_hidden(inputs))
  print(f"{variant}: {agree:.2%} of tokens agree, max |hidden difference| {worst:.2e}",
        *notes, sep="\n")
  assert agree >= 0.999, "\n".join(notes)
  assert worst <= 1e-4


@needs_espeak
def test_sharded_batch_equals_one_device(clips, reference):
  """8 (fake) devices, batch 8 sharded over them == one device."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py forces 8 host devices)")
  _, folder = reference
  cfg, _ = config_lib.read(folder)
  tensors = weights.read(folder, cfg)
  one = WhisperVQTokenizer(cfg, tensors, devices=jax.devices()[:1], batch=8)
  eight = WhisperVQTokenizer(cfg, tensors, batch=8)
  assert eight.mesh.size == 8 and one.mesh.size == 1
  inputs = clips[:-1] * 2  # 10 windows of one padded length group: batches of 8 and 2
  for (c1, h1), (c8, h8) in zip(one.encode_with_hidden(inputs),
                                eight.encode_with_hidden(inputs)):
    np.testing.assert_array_equal(c1, c8)
    np.testing.assert_allclose(h1, h8, rtol=0, atol=1e-6)


# ---- The work directory through the CLI and the API ---------------------------------------


@needs_espeak
def test_import_encode_and_api(clips, reference, tmp_path, capsys):
  model, folder = reference
  out = tmp_path / "glm_tok"
  assert cli.main(["tokenizer", "import", "--from", str(folder), "--workdir", str(out)]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["codebook_size"] == 256 and summary["workdir"] == str(out)
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                   "whisper_vq_import.json"]
  wav = tmp_path / "a.wav"
  import scipy.io.wavfile
  scipy.io.wavfile.write(wav, 16000, (clips[1] * 32767).astype(np.int16))
  samples = audio_lib.read(wav).samples
  want = model.tokenize(samples)[0].tolist()

  assert cli.main(["tokenizer", "encode", "--workdir", str(out), str(wav)]) == 0
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert row["audio"] == str(wav) and row["tokens"] == want

  tok = SpeechTokenizer.load(str(out), lm=None)
  assert [r["tokens"] for r in tok.encode_files([str(wav)])] == [want]
  from sptlm.t2t import pairs
  ident = pairs.identity(str(out), tok)  # what t2t pairs record about their tokenizer
  assert ident["codebook_size"] == 256 and len(ident["fingerprint"]) == 16

  assert cli.main(["tokenizer", "transcribe", "--workdir", str(out), str(wav)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no ASR head" in err[0]
  # the imported directory is itself a valid checkpoint folder: importing it again works
  assert cli.main(["tokenizer", "import", "--from", str(out), "--workdir",
                   str(tmp_path / "again")]) == 0


# ---- Bad checkpoints: one line, nothing written --------------------------------------------


def _tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  out = {}
  for p in sorted(folder.glob("model*.safetensors")):
    out.update(load_file(str(p)))
  return out


def _write(folder: pathlib.Path, cfg: dict, tensors: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(cfg))
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _without(key):
  return lambda c, t: (c, {k: v for k, v in t.items() if k != key})


BAD = {
    "architecture": (lambda c, t: ({**c, "architectures": ["LlamaForCausalLM"]}, t),
                     "architectures=['LlamaForCausalLM'] is not a WhisperVQ tokenizer"),
    "pooling_kernel_size": (lambda c, t: ({**c, "pooling_kernel_size": 2}, t),
                            "pooling_kernel_size=2 makes 25 Hz tokens"),
    "pooling_type": (lambda c, t: ({**c, "pooling_type": "max"}, t), "pooling_type is 'max'"),
    "heads": (lambda c, t: ({**c, "encoder_attention_heads": 5}, t),
              "d_model=64 is not a multiple of encoder_attention_heads=5"),
    "quantize_position": (lambda c, t: ({**c, "quantize_position": 9}, t),
                          "quantize_position=9 is above encoder_layers=4"),
    "missing": (_without("model.encoder.layers.1.fc1.bias"),
                "missing tensors model.encoder.layers.1.fc1.bias"),
    "extra": (lambda c, t: (c, {**t, "model.encoder.adapter.weight": np.zeros(3, np.float32)}),
              "tensors outside the WhisperVQ layout of config.json: model.encoder.adapter.weight"),
    "dtype": (lambda c, t: (c, {**t, "model.encoder.conv1.bias": np.zeros(64, np.int8)}),
              "model.encoder.conv1.bias has dtype I8"),
    "shape": (lambda c, t: (c, {**t, "model.encoder.codebook.weight": np.zeros((128, 64),
                                                                                np.float32)}),
              "model.encoder.codebook.weight has shape [128, 64], the config wants [256, 64]"),
}


@needs_espeak
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_one_line(case, reference, tmp_path, capsys):
  _, good = reference
  mutate, message = BAD[case]
  cfg, tensors = mutate(json.loads((good / "config.json").read_text()), _tensors(good))
  _write(tmp_path / "src", cfg, tensors)
  out = tmp_path / "out"
  assert cli.main(["tokenizer", "import", "--from", str(tmp_path / "src"), "--workdir",
                   str(out)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err
  assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_folder_problems_are_one_line(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text(json.dumps(ref.small_config()))
  (pickled / "pytorch_model.bin").write_bytes(b"not read")
  cases = [(tmp_path / "empty", "no config.json"),
           (tmp_path / "nowhere", "no such directory"),
           (pickled, "pytorch_model.bin: pickle files, which sptlm does not read")]
  for folder, message in cases:
    assert cli.main(["tokenizer", "import", "--from", str(folder), "--workdir",
                     str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_existing_workdir_is_refused(reference, tmp_path, capsys):
  _, good = reference
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert cli.main(["tokenizer", "import", "--from", str(good), "--workdir", str(out)]) == 1
  assert "exists and is not empty" in capsys.readouterr().err
  assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ---- Full size, ahead of time ----------------------------------------------------------------

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu: pip install 'sptlm[tpu-aot]'")


def test_full_size_parameters():
  """GLM-4-Voice's tokenizer path: whisper-large-v3 width, 16 layers, 16,384 codes."""
  from flax import nnx
  from sptlm.speech.whisper_vq import aot, model
  cfg = aot.full_size()
  params = nnx.split(model.abstract(cfg), nnx.Param)[1].to_pure_dict()
  count = sum(x.size for x in jax.tree.leaves(params))
  assert count == aot.num_params(cfg) == sum(
      int(np.prod(s)) for s in weights.needed_shapes(cfg).values()) == 343_119_360
  assert aot.window_flops(cfg) == pytest.approx(1.161e12, rel=1e-3)


@pytest.mark.slow  # a TPU compile through libtpu (tests/test_aot.py keeps one in the default set)
@needs_libtpu
@needs_espeak
def test_cli_compile_for_a_tpu_topology(reference, tmp_path, capsys):
  _, folder = reference
  importer.import_checkpoint(folder, tmp_path / "tok")
  assert cli.main(["tokenizer", "compile", "--topology", "v5e-4", "--workdir",
                   str(tmp_path / "tok"), "--per-device-batch", "1"]) == 0
  out = capsys.readouterr().out
  for row in ("on v5e-4 (4 x TPU v5 lite", "temporaries", "total", "FLOPs per 30 s window",
              "audio hours per chip-hour"):
    assert row in out, out


@needs_libtpu
@pytest.mark.slow  # compiles the 343M-parameter encoder for TPU: minutes of CPU
def test_full_size_encoder_fits_a_v5e_chip():
  from sptlm.speech.whisper_vq import aot
  r = aot.compile_encoder(aot.full_size(), "v5e-8", per_device_batch=8)
  print(aot.format_report(r))
  assert 4 * aot.num_params(aot.full_size()) < r["total_bytes"] < r["hbm_bytes_per_device"]
