"""Config files load, command-line overrides apply, and bad values fail naming their key."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from sptlm import config, config_io

TINY = pathlib.Path(__file__).resolve().parent.parent / "configs" / "tiny.py"


def raises_naming(key: str) -> pytest.RaisesExc[config.ConfigError]:
  """Expects a ConfigError whose message names `key`."""
  return pytest.raises(config.ConfigError, match=re.escape(key))


def test_every_config_loads(config_path: pathlib.Path) -> None:
  cfg = config.load(config_path)
  assert isinstance(cfg, config.Config)
  assert isinstance(cfg.model, config.ModelConfig)
  assert all(isinstance(axes, tuple) for _, axes in cfg.mesh.rules)


def test_overrides_apply(config_path: pathlib.Path) -> None:
  cfg = config.load(config_path, [
      "--config.train.steps=10",
      "--config.train.warmup_steps=2",
      "--config.train.learning_rate=1",  # an int where a float is declared becomes a float
      "--config.train.async_checkpoints=False",
      "--config.model.remat=dots",  # a bare string
      "--config.mesh.rules.length=fsdp",
      "config.train.seed=7",  # the `--` is optional
  ])
  assert cfg.train.steps == 10 and cfg.train.warmup_steps == 2
  assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
  assert cfg.train.async_checkpoints is False
  assert cfg.model.remat == "dots"
  assert dict(cfg.mesh.rules)["length"] == ("fsdp",)
  assert cfg.train.seed == 7
  assert config.load(config_path).train.steps != 10  # overrides do not leak between loads


def test_steps_override_alone() -> None:
  """A short run needs no warmup override: the schedule caps warmup at steps - 1."""
  assert config.load(TINY, ["--config.train.steps=10"]).train.steps == 10


@pytest.mark.parametrize("text, axes", [("None", ()), ("('tensor','fsdp')", ("tensor", "fsdp"))])
def test_rule_override_to_none_or_tuple(text: str, axes: tuple[str, ...]) -> None:
  cfg = config.load(TINY, [f"--config.mesh.rules.heads={text}"])
  assert dict(cfg.mesh.rules)["heads"] == axes


@pytest.mark.parametrize("override, key", [
    ("--config.train.stepz=10", "train.stepz"),
    ("--config.optimizer.lr=1", "optimizer"),
    ("--config.model.num_layerz=2", "model.num_layerz"),
])
def test_unknown_key_is_an_error(override: str, key: str) -> None:
  with raises_naming(key):
    config.load(TINY, [override])


def test_unknown_key_in_a_file_is_an_error() -> None:
  raw = config_io.load_config_file(TINY)
  raw.train.bogus = 1
  with pytest.raises(config.ConfigError, match=r"train.*bogus"):
    config.from_config_dict(raw)


@pytest.mark.parametrize("override, key", [
    ("--config.train.steps=abc", "train.steps"),
    ("--config.train.steps=1.5", "train.steps"),
    ("--config.train.steps=True", "train.steps"),
    ("--config.model.scan_layers=3", "model.scan_layers"),
])
def test_wrong_type_is_an_error(override: str, key: str) -> None:
  with raises_naming(key):
    config.load(TINY, [override])


def test_wrong_type_in_json_is_an_error() -> None:
  raw = json.loads(config.to_json(config.load(TINY)))
  raw["train"]["steps"] = "abc"
  with raises_naming("train.steps"):
    config.from_json(json.dumps(raw))


@pytest.mark.parametrize("override, key", [
    ("--config.train.keep_checkpoints=1", "train.keep_checkpoints"),
    ("--config.train.warmup_steps=-1", "train.warmup_steps"),
    ("--config.model.num_kv_heads=3", "model.num_kv_heads"),
    ("--config.model.rope_style=neox", "model.rope_style"),
    ("--config.mesh.rules.heads=model", "mesh.rules['heads']"),
])
def test_invalid_value_is_an_error(override: str, key: str) -> None:
  with raises_naming(key):
    config.load(TINY, [override])


def test_malformed_override_is_an_error() -> None:
  with raises_naming("train.steps"):
    config.load(TINY, ["--config.train.steps"])


def test_missing_file_is_an_error(tmp_path: pathlib.Path) -> None:
  with raises_naming(str(tmp_path / "nope.py")):
    config.load(tmp_path / "nope.py")


def test_json_round_trip(config_path: pathlib.Path) -> None:
  cfg = config.load(config_path, ["--config.train.seed=3"])
  assert config.from_json(config.to_json(cfg)) == cfg


# ---- Values checked when the config loads -------------------------------------------------------


def test_each_check_names_key_value_and_what_is_allowed() -> None:
  """A key with a fixed set of values names the key, the bad value and every allowed value."""
  with pytest.raises(config.ConfigError) as info:
    config.load(TINY, ["--config.model.remat=dot"])
  assert str(info.value) == ("model.remat='dot' is not one of: "
                             "none, full, dots, dots_no_batch, attention_out")


@pytest.mark.parametrize("key, bad, allowed", [
    ("model.remat", "dot", config.REMAT_NAMES),
    ("model.attention", "flash", config.ATTENTION_BACKENDS),
    ("model.rope_style", "neox", config.ROPE_STYLES),
    ("model.dtype", "fp8", config.DTYPES),
    ("model.param_dtype", "int8", config.DTYPES),
    ("train.schedule", "step", config.SCHEDULES),
])
def test_fixed_choice_keys(key: str, bad: str, allowed: tuple[str, ...]) -> None:
  with pytest.raises(config.ConfigError) as info:
    config.load(TINY, [f"--config.{key}={bad}"])
  message = str(info.value)
  assert message.startswith(f"{key}={bad!r} is not one of: "), message
  assert message.endswith(", ".join(allowed)), message
  assert "\n" not in message


def test_choice_lists_match_the_code_that_uses_them() -> None:
  """config.py keeps the names so loading a config imports no jax; they must not drift."""
  from sptlm.model import attention, transformer
  from sptlm.speech import model as speech_model
  assert config.REMAT_NAMES == tuple(transformer.REMAT_POLICIES)
  assert config.ATTENTION_BACKENDS == tuple(attention.BACKENDS)
  assert config.DTYPES == tuple(transformer.DTYPES) == tuple(speech_model.DTYPES)


def test_loading_a_config_imports_no_jax() -> None:
  code = ("import sys; from sptlm import config; from sptlm.speech import config as s; "
          "print(sorted(m for m in ('jax', 'flax', 'sptlm.model') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=TINY.parent.parent).stdout
  assert out.strip() == "[]"


@pytest.mark.parametrize("override, message", [
    ("model.num_layers=0", "model.num_layers=0 must be at least 1"),
    ("model.num_kv_heads=0", "model.num_kv_heads=0 must be at least 1"),  # not a ZeroDivisionError
    ("model.head_dim=0", "model.head_dim=0 must be at least 1"),
    ("model.rope_theta=0", "model.rope_theta=0.0 must be above 0"),
    ("model.attention_chunk=-1", "model.attention_chunk=-1 must be at least 0"),
    ("model.attention_chunk=48", "model.attention_chunk=48 must divide data.seq_len=128"),
    ("model.loss_chunk=48", "model.loss_chunk=48 must divide data.seq_len=128"),
    ("vocab.text_size=0", "vocab.text_size=0 must be at least 1"),
    ("vocab.speech_size=-1", "vocab.speech_size=-1 must be at least 0"),
    ("data.seq_len=0", "data.seq_len=0 must be at least 1"),
    ("data.global_batch_size=0", "data.global_batch_size=0 must be at least 1"),
    ("data.num_shards=0", "data.num_shards=0 must be at least 1"),
    ("data.num_shards=3", "data.num_shards=3 must divide data.global_batch_size=16"),
    ("train.steps=0", "train.steps=0 must be at least 1"),
    ("train.microbatches=3", "data.global_batch_size=16 must be divisible by "
                             "train.microbatches=3"),
    ("train.learning_rate=0", "train.learning_rate=0.0 must be above 0"),
    ("train.learning_rate=-1e-3", "train.learning_rate=-0.001 must be above 0"),
    ("train.min_learning_rate=0.01", "train.min_learning_rate=0.01 must be within "
                                     "0..train.learning_rate=0.003"),
    ("train.min_learning_rate=-1e-4", "train.min_learning_rate=-0.0001 must be within 0.."),
    ("train.b1=1", "train.b1=1.0 must be in [0, 1)"),
    ("train.b2=-0.5", "train.b2=-0.5 must be in [0, 1)"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be at least 0"),
    ("train.clip_norm=0", "train.clip_norm=0.0 must be above 0"),
    ("train.schedule_steps=-1", "train.schedule_steps=-1 must be at least 0"),
])
def test_out_of_range_values(override: str, message: str) -> None:
  with pytest.raises(config.ConfigError) as info:
    config.load(TINY, [f"--config.{override}"])
  assert str(info.value).startswith(message), str(info.value)


def test_pallas_blocks_are_checked_only_for_the_pallas_backend() -> None:
  config.load(TINY, ["--config.model.attention_block_q=100"])  # unused by the reference backend
  with raises_naming("model.attention_block_q=100 must be a positive multiple of 128"):
    config.load(TINY, ["--config.model.attention=pallas", "--config.model.attention_block_q=100"])


@pytest.mark.parametrize("overrides, message", [
    (["--config.mesh.tensor=0"],
     "mesh.tensor=0 must be a positive device count or -1 (the devices left over)"),
    (["--config.mesh.fsdp=-2"],
     "mesh.fsdp=-2 must be a positive device count or -1 (the devices left over)"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"],
     "mesh.data=-1 and mesh.fsdp=-1: at most one mesh axis may take the devices left over; "
     "give mesh.fsdp a size (e.g. 1)"),
])
def test_mesh_sizes(overrides: list[str], message: str) -> None:
  with pytest.raises(config.ConfigError) as info:
    config.load(TINY, overrides)
  assert str(info.value) == message


def test_mesh_sizes_accept_one_free_axis() -> None:
  cfg = config.load(TINY, ["--config.mesh.data=2", "--config.mesh.fsdp=-1",
                           "--config.mesh.tensor=2"])
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (2, -1, 2)


@pytest.mark.parametrize("sizes, devices, message", [
    ({"data": -1, "fsdp": 3, "tensor": 1}, 8,
     "mesh.data=-1 mesh.fsdp=3 mesh.tensor=1: the fixed sizes (3 devices) do not divide the 8 "
     "devices; give mesh.fsdp a size that divides 8"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, 8,
     "mesh.data=2 mesh.fsdp=2 mesh.tensor=1 needs 4 devices, 8 are available; set mesh.data=-1 "
     "to give it the devices left over"),
    ({"data": 3, "fsdp": 3, "tensor": 1}, 8,
     "mesh.data=3 mesh.fsdp=3 mesh.tensor=1 needs 9 devices, 8 are available; give the mesh "
     "axes sizes whose product is 8"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, 8,
     "mesh.data=-1 and mesh.fsdp=-1: at most one mesh axis may take the devices left over; "
     "give mesh.fsdp a size (e.g. 1)"),
    ({"data": 1, "fsdp": 0, "tensor": 1}, 8,
     "mesh.fsdp=0 must be a positive device count or -1 (the devices left over)"),
])
def test_mesh_that_does_not_fit_the_devices(sizes: dict[str, int], devices: int,
                                            message: str) -> None:
  """Known only at run time: sharding.mesh_shape names the keys, the devices and the fix."""
  from sptlm import errors, sharding
  with pytest.raises(config.ConfigError) as info:
    sharding.mesh_shape(sizes, devices)
  assert isinstance(info.value, errors.UserError)
  assert str(info.value) == message
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)


def test_schedule_steps_defaults_to_zero_and_overrides_though_no_file_sets_it() -> None:
  assert "schedule_steps" not in config_io.load_config_file(TINY).train
  assert config.load(TINY).train.schedule_steps == 0
  cfg = config.load(TINY, ["--config.train.schedule_steps=600"])
  assert cfg.train.schedule_steps == 600
  assert config.from_json(config.to_json(cfg)) == cfg
  with raises_naming("train.schedule_steps"):
    config.load(TINY, ["--config.train.schedule_steps=abc"])
  with raises_naming("train.schedule_stepz"):  # only declared keys may be added
    config.load(TINY, ["--config.train.schedule_stepz=600"])


def test_config_json_of_an_older_run_still_loads() -> None:
  raw = json.loads(config.to_json(config.load(TINY)))
  del raw["train"]["schedule_steps"]
  assert config.from_json(json.dumps(raw)).train.schedule_steps == 0


def test_config_error_is_a_user_error_and_a_value_error() -> None:
  from sptlm import errors
  assert issubclass(config.ConfigError, errors.UserError)
  assert issubclass(config.ConfigError, ValueError)
