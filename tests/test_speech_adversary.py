"""The engine adversary (asr.engine_adversary_weight): a head learns each token's TTS engine and
the encoder learns to leave it unsure, so the tokens are pushed to hide the engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sptlm import sharding
from sptlm.speech import config as config_lib
from sptlm.speech import input as input_lib
from sptlm.speech import program
from sptlm.speech.manifest import Utterance
from sptlm.speech.engines import ADVERSARY_ENGINES, ENGINES

from test_speech_model import small_config  # noqa: E402  (tests/ is on sys.path)

STEPS = ["--config.train.steps=100", "--config.train.warmup_steps=1"]


def _config(*extra: str) -> config_lib.SpeechTokenizerConfig:
  return small_config(*STEPS, *extra)


def _batch(cfg: config_lib.SpeechTokenizerConfig, engines: list[int]) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  audios = [(rng.normal(size=rng.integers(12, 32) * 1280) * 0.2).astype(np.float32)
            for _ in engines]
  labels = [rng.integers(1, 30, rng.integers(3, 8)).astype(np.int32) for _ in engines]
  return input_lib.make_batch(audios, labels, 32, cfg.model.num_mels,
                              32 * cfg.model.ctc_upsample, engines)


def test_confusion_ramps_in_from_zero_to_almost_one():
  s = [float(program.adversary_ramp(jnp.int32(k), 1000)) for k in (0, 100, 500, 1000)]
  assert s[0] == 0.0 and s == sorted(s)
  assert s[1] == pytest.approx(2 / (1 + np.exp(-1.0)) - 1, rel=1e-5)
  assert s[3] == pytest.approx(0.99991, abs=1e-4)


def test_engine_classes_and_batches_carry_them():
  assert input_lib.engine_class("mbrola") == ENGINES.index("mbrola")
  assert input_lib.engine_class("kokoro") == -1  # newer than the head: left out of it
  assert input_lib.engine_class("") == input_lib.engine_class("a recording") == -1
  cfg = _config()
  assert _batch(cfg, [0, 3, -1])["engine"].tolist() == [0, 3, -1]
  default = input_lib.make_batch([np.zeros(2560, np.float32)], [np.ones(2, np.int32)], 4,
                                 cfg.model.num_mels, 16)
  assert default["engine"].tolist() == [-1]


def test_train_iterator_reads_each_clip_engine_from_the_manifest():
  class Source:
    def load(self, utt: Utterance) -> np.ndarray:
      return np.random.default_rng(int(utt.id)).normal(size=16 * 1280).astype(np.float32) * 0.1

  names = ["espeak", "piper", "", "festival"]
  utts = [Utterance(str(k), f"{k}.wav", "text", "train", engine=e) for k, e in enumerate(names)]
  data = input_lib.Prepared(utts, np.full(4, 16), [np.ones(3, np.int32)] * 4, 0, 0)
  it = input_lib.train_iterator(Source(), data, input_lib.bucket_shapes((1.6,), 6.4, 1),
                                steps=1, seed=0, num_mels=16, ctc_upsample=4)
  seen = {}
  for _ in range(2):  # the plan orders utterances by its seed; map each row back by its audio
    batch = next(it)
    for row, engine in zip(batch["mel"], batch["engine"]):
      seen[round(float(np.abs(row).sum()), 3)] = int(engine)
  want = {}
  for k, e in enumerate(names):
    ref = input_lib.make_batch([Source().load(utts[k])], [np.ones(3, np.int32)], 20, 16, 80)
    want[round(float(np.abs(ref["mel"][0]).sum()), 3)] = input_lib.engine_class(e)
  assert seen == want


_GRAD = jax.jit(jax.grad(program.loss_fn, has_aux=True), static_argnums=(2, 4, 6, 7))


def _grads(cfg, batch, engine_weight, confusion):
  graphdef, params, vq_state = program.split(program.make_model(cfg, cfg.asr.units))
  g, aux = _GRAD(params, vq_state, graphdef, {k: jnp.asarray(v) for k, v in batch.items()},
                 0.25, jnp.bool_(True), 0.0, engine_weight, jnp.float32(confusion))
  return jax.device_get(g), jax.device_get(aux)


def test_the_head_learns_the_engines_and_only_the_confusion_reaches_the_encoder():
  cfg = _config("--config.asr.engine_adversary_weight=1.0")
  batch = _batch(cfg, [0, 1, 2, 3])
  g_on, aux = _grads(cfg, batch, 1.0, 1.0)
  g_head, _ = _grads(cfg, batch, 1.0, 0.0)  # confusion ramped to 0: the head's loss alone
  g_none, _ = _grads(cfg, batch, 0.0, 1.0)  # no adversary at all
  assert aux["loss_engine"] > 0 and 0.0 <= aux["engine_accuracy"] <= 1.0
  # bounded: cross-entropy to the uniform over 4 engines is at least log 4, whatever the encoder
  assert aux["loss_confusion"] >= np.log(4) - 1e-5
  for name in ("engine_hidden", "engine_head"):  # the confusion loss never trains the head
    np.testing.assert_allclose(g_on[name]["kernel"], g_head[name]["kernel"], rtol=1e-5)
    assert np.abs(g_on[name]["kernel"]).max() > 0
    assert np.abs(g_none[name]["kernel"]).max() == 0
  enc = g_on["conv1"]["kernel"], g_head["conv1"]["kernel"], g_none["conv1"]["kernel"]
  np.testing.assert_allclose(enc[1], enc[2], rtol=1e-5, atol=1e-9)  # the head's loss stops there
  assert np.abs(enc[0] - enc[2]).max() > 1e-3 * np.abs(enc[2]).max()  # the confusion does not
  # above the VQ nothing sees the adversary
  np.testing.assert_allclose(g_on["ctc_head"]["kernel"], g_none["ctc_head"]["kernel"],
                             rtol=1e-5, atol=1e-8)


def test_clips_without_a_known_engine_are_left_out():
  cfg = _config("--config.asr.engine_adversary_weight=1.0")
  g, aux = _grads(cfg, _batch(cfg, [-1, -1]), 1.0, 1.0)
  assert aux["loss_engine"] == 0.0 and np.abs(g["engine_head"]["kernel"]).max() == 0
  _, mixed = _grads(cfg, _batch(cfg, [2, -1]), 1.0, 1.0)
  _, alone = _grads(cfg, {k: v[:1] for k, v in _batch(cfg, [2, -1]).items()}, 1.0, 1.0)
  np.testing.assert_allclose(mixed["loss_engine"], alone["loss_engine"], rtol=1e-5)


def test_train_step_reports_the_adversary_and_off_means_no_head():
  cfg = _config("--config.asr.engine_adversary_weight=0.3")
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  prog = program.build(cfg, mesh, cfg.asr.units)
  state = prog.init()
  batch = prog.global_batch(_batch(cfg, [0, 1, 0, 1]))
  for _ in range(3):
    state, metrics = prog.step(state, batch)
  m = jax.device_get(metrics)
  assert np.isfinite(m["loss"]) and m["loss_engine"] > 0
  assert m["loss_confusion"] >= np.log(2) - 1e-5  # two engines in the batch
  assert state["params"]["engine_head"]["kernel"].shape == (32, len(ADVERSARY_ENGINES))
  off = program.make_model(_config(), 32)
  assert off.engine_head is None and off.engine_hidden is None  # old work dirs: same tree


def test_config_refuses_a_negative_weight_and_old_configs_load():
  with pytest.raises(config_lib.ConfigError, match="asr.engine_adversary_weight"):
    _config("--config.asr.engine_adversary_weight=-0.1")
  cfg = _config()
  assert cfg.asr.engine_adversary_weight == 0.0
  assert config_lib.from_json(config_lib.to_json(cfg)) == cfg
