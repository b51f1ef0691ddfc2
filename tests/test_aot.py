"""`sptlm compile`: TPU topology names, and the train step compiled ahead of time on this CPU.

The compile tests need libtpu (the `tpu-aot` extra) and run with JAX_PLATFORMS=cpu: the
topology API loads the TPU plugin by itself and never needs a TPU backend.
"""

import importlib.util
import pathlib

import pytest

from sptlm import aot, cli, config

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"

TINY = str(CONFIG_DIR / "tiny.py")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu: pip install 'sptlm[tpu-aot]'")


@pytest.mark.parametrize("name, jax_name, devices", [
    ("v5p-8", "v5p:2x2x1", 4),
    ("v5p-16", "v5p:2x2x2", 8),
    ("v5p-64", "v5p:2x4x4", 32),
    ("v5p-128", "v5p:4x4x4", 64),
    ("v5p-384", "v5p:4x4x12", 192),
    ("v5p-1024", "v5p:8x8x8", 512),
    ("v4-128", "v4:4x4x4", 64),
    ("v5e-16", "v5e:4x4", 16),
    ("v5litepod-8", "v5e:2x4", 8),
    ("v5e-256", "v5e:16x16", 256),
    ("v6e-64", "v6e:8x8", 64),
    ("v5p:4x4x8", "v5p:4x4x8", 128),
    ("v5e:2x2", "v5e:2x2", 4),
    ("V5P-128", "v5p:4x4x4", 64),
])
def test_parse_topology(name, jax_name, devices):
  topo = aot.parse_topology(name)
  assert (topo.jax_name, topo.num_devices) == (jax_name, devices)
  jax_name_again, devices_again, *_ = topo  # also a plain tuple
  assert (jax_name_again, devices_again) == (jax_name, devices)


def test_parse_topology_cloud_and_raw_names_agree():
  assert aot.parse_topology("v5p:4x4x4") == aot.parse_topology("v5p-128")
  assert aot.parse_topology("v5e:4x4") == aot.parse_topology("v5litepod-16")
  assert aot.parse_topology("v5p-128").wrap == (True, True, True)  # a full cube is a torus
  assert aot.parse_topology("v5p-64").wrap == (False, False, False)


@pytest.mark.parametrize("name", ["", "tpu", "v5p", "v5p-7", "v5p-96", "v5e-12", "v7-8",
                                  "v5p:2x2", "v5e:2x2x1", "v5p:0x2x2", "h100-8"])
def test_parse_topology_rejects_with_one_line(name):
  with pytest.raises(ValueError, match="accepted: ") as info:
    aot.parse_topology(name)
  assert "\n" not in str(info.value)


def test_missing_libtpu_says_what_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(ValueError, match=r"pip install 'sptlm\[tpu-aot\]'"):
    aot.topology_devices(aot.parse_topology("v5p-8"))


@pytest.fixture(scope="module")
def tiny_report() -> dict:
  """The tiny config on a v5p-8 (4 chips) over a mesh using all of them: data 2 x fsdp 2."""
  cfg = config.load(TINY, ["--config.mesh.data=-1", "--config.mesh.fsdp=2"])
  return aot.compile_for_topology(cfg, "v5p-8", per_device_batch=2)


@needs_libtpu
def test_compile_tiny_for_v5p(tiny_report):
  r = tiny_report
  assert r["device_kind"].startswith("TPU v5") and r["num_devices"] == 4
  assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert r["global_batch"] == 8  # 2 per device x 4 devices
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "num_params",
              "flops_per_step", "flops_per_device", "compile_seconds"):
    assert r[key] > 0, key
  assert r["total_bytes"] == (r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
                              - r["alias_bytes"])
  assert r["alias_bytes"] > 0  # the state is donated
  # ~1M float32 params + Adam moments, split over 2 fsdp shards, plus small activations.
  assert 12 * r["num_params"] / 2 < r["total_bytes"] < 0.5e9
  assert r["flops_per_device"] * 4 == pytest.approx(r["flops_per_step"])
  assert r["unsharded_params"] == []
  text = aot.format_report(r)
  assert "temporaries" in text and "v5p:2x2x1" in text


@needs_libtpu
def test_cli_compile_prints_the_table(capsys):
  assert cli.main(["compile", "--config", TINY, "--topology", "v5e-4",
                   "--per-device-batch", "1", "--config.model.remat=full"]) == 0
  out = capsys.readouterr().out
  assert "tiny on v5e-4 (4 x TPU v5 lite" in out
  for row in ("arguments", "outputs", "temporaries", "total", "FLOPs per step"):
    assert row in out, row


def test_cli_compile_bad_topology_is_one_line_error(capsys):
  assert cli.main(["compile", "--config", TINY, "--topology", "v5p-7"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "accepted: " in err[0]


@needs_libtpu
def test_batch_that_does_not_divide_over_the_mesh_is_an_error():
  cfg = config.load(TINY, ["--config.data.global_batch_size=6"])
  with pytest.raises(ValueError, match="global_batch_size=6"):
    aot.compile_for_topology(cfg, "v5p-8")


@needs_libtpu
@pytest.mark.slow
def test_lm_1b_fits_a_v5p_128():
  cfg = config.load(CONFIG_DIR / "lm_1b.py")
  r = aot.compile_for_topology(cfg, "v5p-128", per_device_batch=1)
  assert r["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
  assert 0 < r["total_bytes"] < r["hbm_bytes_per_device"]
