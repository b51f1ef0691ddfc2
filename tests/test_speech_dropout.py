"""asr.dropout: training-time dropout in the layers above the bottleneck only, keyed by the step
(so a resumed or resharded run draws the same masks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sptlm import sharding
from sptlm.config import ConfigError
from sptlm.speech import input as input_lib
from sptlm.speech import model as model_lib
from sptlm.speech import program

from test_speech_model import small_config  # noqa: E402  (tests/ is on sys.path)


def test_dropout_zeroes_at_its_rate_and_rescales_the_rest():
  x = jnp.ones((64, 64), jnp.float32)
  drop = model_lib.Dropout(0.25, jax.random.key(0))
  y = np.asarray(model_lib.dropout(x, drop, drop.key))
  assert 0.22 < np.mean(y == 0) < 0.28
  np.testing.assert_array_equal(np.unique(y), [0.0, np.float32(1 / 0.75)])
  np.testing.assert_array_equal(y, model_lib.dropout(x, drop, drop.key))  # the key decides
  assert model_lib.dropout(x, None, None) is x


def _steps(cfg, data: int, runs: int = 1) -> list[dict] | list[list[dict]]:
  """Metrics of 3 steps from init on one fixed batch; `runs` > 1: that many times over with one
  compiled program."""
  rng = np.random.default_rng(0)
  audios = [(rng.normal(size=rng.integers(10, 32) * 1280) * 0.2).astype(np.float32)
            for _ in range(4)]
  labels = [rng.integers(1, 30, rng.integers(3, 8)).astype(np.int32) for _ in range(4)]
  batch = input_lib.make_batch(audios, labels, 32, cfg.model.num_mels,
                               32 * cfg.model.ctc_upsample)
  mesh = sharding.make_mesh({"data": data, "fsdp": 1, "tensor": 1}, jax.devices()[:data])
  prog = program.build(cfg, mesh, cfg.asr.units)
  outs = []
  for _ in range(runs):
    state, out = prog.init(), []
    for _ in range(3):
      state, metrics = prog.step(state, prog.global_batch(batch))
      out.append(jax.device_get(metrics))
    outs.append(out)
  return outs[0] if runs == 1 else outs


def test_asr_dropout_changes_the_asr_loss_not_the_tokens():
  """Same init, same batch: with dropout the CTC loss differs from step 1 on, while the
  encoder and codebook (not dropped) give the very same codes at step 1; the masks depend on
  the step alone, so two runs, and a run on two data shards, agree."""
  extra = ("--config.train.steps=4", "--config.train.warmup_steps=1",
           "--config.model.token_rate_layers=1", "--config.vq.warmup_steps=0")
  plain = _steps(small_config(*extra), 1)
  dropped, again = _steps(small_config(*extra, "--config.asr.dropout=0.3"), 1, runs=2)
  assert dropped[0]["loss_ctc"] != plain[0]["loss_ctc"]
  for key in ("code_perplexity", "code_usage", "loss_commit"):
    assert dropped[0][key] == plain[0][key], key
  for a, b in zip(dropped, again):
    assert a["loss"] == b["loss"]
  sharded = _steps(small_config(*extra, "--config.asr.dropout=0.3"), 2)
  for a, b in zip(dropped, sharded):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-5)


@pytest.mark.parametrize("rate", ["-0.1", "1.0"])
def test_dropout_rate_out_of_range_is_a_config_error(rate):
  with pytest.raises(ConfigError, match=r"asr.dropout=.* must be within \[0, 1\)"):
    small_config(f"--config.asr.dropout={rate}")
