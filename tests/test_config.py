"""Config files load, command-line overrides apply, and bad values fail naming their key."""

import json
import pathlib
import re

import pytest

from sptlm import config

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
  raw = config.load_config_file(TINY)
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
