"""Shared test setup: 8 host CPU devices for mesh tests, and the config files as fixtures.

The environment is set at import, before anything imports jax, so even a TPU host runs the
default suite on CPU (set JAX_PLATFORMS yourself to override).
"""

import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}".strip()

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # plain `pytest` from anywhere finds sptlm
  sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402

from sptlm import config, config_io  # noqa: E402

CONFIG_DIR = REPO_ROOT / "configs"


def config_files(kind: str = "lm") -> list[pathlib.Path]:
  """The config files of one kind: "lm" (no `kind` key) or their `kind`, e.g. "speech_tokenizer".

  Files starting with `_` are shared pieces, not configs.
  """
  paths = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))
  return [p for p in paths if _kind(p) == kind]


def _kind(path: pathlib.Path) -> str:
  """A config file's `kind` key ("lm" when it has none)."""
  try:
    return config_io.load_config_file(path).get("kind", "lm")
  except config.ConfigError:
    return "lm"  # a broken file: let the LM config tests report it


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
  """A test that takes `config_path` runs once per language-model config file."""
  if "config_path" in metafunc.fixturenames:
    paths = config_files("lm")
    metafunc.parametrize("config_path", paths, ids=[p.stem for p in paths])


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_config() -> config.Config:
  return config.load(CONFIG_DIR / "tiny.py")


@pytest.fixture(scope="session")
def trained_t2t(tmp_path_factory) -> pathlib.Path:
  """The tiny text-to-token model of the synthetic language (tests/t2t_synthetic.py), trained
  once per session: test_t2t and the data pipeline's tests share it."""
  import t2t_synthetic
  return t2t_synthetic.train(tmp_path_factory.mktemp("t2t"))
