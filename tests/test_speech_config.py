"""The speech tokenizer config: every value is checked when it loads, naming key and value."""

import json
import pathlib

import pytest

from sptlm import config as lm_config
from sptlm.speech import config as config_lib

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "speech_tokenizer_tiny.py"


@pytest.mark.parametrize("key, bad, allowed", [
    ("model.positions", "alibi", config_lib.POSITIONS),
    ("model.dtype", "fp8", lm_config.DTYPES),
    ("model.param_dtype", "int8", lm_config.DTYPES),
    ("asr.unit_type", "bpe", config_lib.UNIT_TYPES),
    ("train.schedule", "step", lm_config.SCHEDULES),
])
def test_fixed_choice_keys(key: str, bad: str, allowed: tuple[str, ...]) -> None:
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.load(CONFIG, [f"--config.{key}={bad}"])
  assert str(info.value) == f"{key}={bad!r} is not one of: {', '.join(allowed)}"


def test_dtype_names_match_the_speech_model() -> None:
  from sptlm.speech import model
  assert lm_config.DTYPES == tuple(model.DTYPES)


@pytest.mark.parametrize("override, message", [
    ("model.num_heads=0", "model.num_heads=0 must be at least 1"),  # not a ZeroDivisionError
    ("model.d_model=0", "model.d_model=0 must be at least 1"),
    ("model.num_mels=0", "model.num_mels=0 must be at least 1"),
    ("model.pool=0", "model.pool=0 must be at least 1"),
    ("model.ctc_upsample=0", "model.ctc_upsample=0 must be at least 1"),
    ("model.layers_before_vq=-1", "model.layers_before_vq=-1 must be at least 0"),
    ("model.max_seconds=0", "model.max_seconds=0.0 must be above 0"),
    ("model.d_model=202", "model.d_model=202 must be a multiple of model.num_heads=4"),
    ("model.d_model=196", "model.positions='rope' rotates pairs of dims: the head width "
                          "model.d_model / model.num_heads = 49 must be even"),
    ("vq.codebook_size=1", "vq.codebook_size=1 must be at least 2"),
    ("vq.ema_decay=1.0", "vq.ema_decay=1.0 must be in (0, 1)"),
    ("vq.commitment_weight=-1", "vq.commitment_weight=-1.0 must be at least 0"),
    ("vq.restart_after=0", "vq.restart_after=0 must be at least 1"),
    ("vq.warmup_steps=-1", "vq.warmup_steps=-1 must be at least 0"),
    ("vq.code_dim=-1", "vq.code_dim=-1 must be at least 0"),
    ("asr.units=4", "asr.units=4 must be at least 8"),
    ("asr.lm_order=-1", "asr.lm_order=-1 must be at least 0"),
    ("asr.beam=0", "asr.beam=0 must be at least 1"),
    ("data.eval_every=0", "data.eval_every=0 must be at least 1"),
    ("data.eval_utterances=-1", "data.eval_utterances=-1 must be at least 0"),
    ("data.bucket_seconds=(0.0, 1.6)", "data.bucket_seconds[0]=0.0 must be above 0"),
    ("data.bucket_seconds=(2.0, 1.6)", "data.bucket_seconds=(2.0, 1.6) must be increasing"),
    ("train.learning_rate=0", "train.learning_rate=0.0 must be above 0"),
    ("train.min_learning_rate=1", "train.min_learning_rate=1.0 must be within 0.."),
    ("train.clip_norm=0", "train.clip_norm=0.0 must be above 0"),
    ("train.schedule_steps=-1", "train.schedule_steps=-1 must be at least 0"),
    ("train.microbatches=2", "train.microbatches=2: the speech tokenizer batches by length"),
    ("mesh.tensor=0", "mesh.tensor=0 must be a positive device count or -1"),
    ("mesh.fsdp=-1", "mesh.data=-1 and mesh.fsdp=-1: at most one mesh axis"),
])
def test_out_of_range_values(override: str, message: str) -> None:
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.load(CONFIG, [f"--config.{override}"])
  assert str(info.value).startswith(message), str(info.value)


def test_sinusoid_positions_allow_an_odd_head_width() -> None:
  cfg = config_lib.load(CONFIG, ["--config.model.positions=sinusoid",
                                 "--config.model.d_model=196"])
  assert cfg.model.d_model // cfg.model.num_heads == 49


def test_train_section_is_the_lm_trainers_own() -> None:
  """One TrainConfig for both trainers: schedule_steps is there, optional, and overridable."""
  assert config_lib.SpeechTokenizerConfig.__annotations__["train"] is lm_config.TrainConfig
  cfg = config_lib.load(CONFIG)
  assert cfg.train.schedule_steps == 0
  cfg = config_lib.load(CONFIG, ["--config.train.schedule_steps=9000"])
  assert cfg.train.schedule_steps == 9000
  assert config_lib.from_json(config_lib.to_json(cfg)) == cfg
  raw = json.loads(config_lib.to_json(cfg))
  del raw["train"]["schedule_steps"]  # a run written before the key existed
  assert config_lib.from_json(json.dumps(raw)).train.schedule_steps == 0
