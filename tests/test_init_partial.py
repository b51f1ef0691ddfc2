"""train.init_partial: start from another run's checkpoint when the config adds arrays (a new
stem, a new head): the arrays the checkpoint holds are copied, the new ones keep their fresh
init, and one of another shape is a one-line error. Real Orbax checkpoints throughout."""

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sptlm.speech import config as speech_config
from sptlm.speech import program as speech_program
from sptlm.train import checkpoint as ckpt_lib
from sptlm.train import loop

from test_reliability import _Iter  # noqa: E402  (tests/ is on sys.path)

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Program:
  """What restore_or_init reads of a program: abstract_state and init()."""

  def __init__(self, fresh: dict):
    self.fresh = fresh
    self.abstract_state = jax.eval_shape(lambda: fresh)

  def init(self) -> dict:
    return self.fresh


class _Empty:
  def restore(self, abstract_state, data_iter, config=None):
    return None


def _save(directory: pathlib.Path, state: dict) -> None:
  c = ckpt_lib.Checkpointer(str(directory), keep=2, async_save=False)
  c.save(5, state, _Iter(), json.dumps({}))
  c.close()


def test_new_arrays_keep_their_init_and_the_others_come_from_the_checkpoint(tmp_path, caplog):
  _save(tmp_path / "src", {"params": {"w": jnp.full((4, 3), 2.0), "b": jnp.arange(3.0)},
                           "opt_state": {"m": jnp.ones((4, 3))}})
  fresh = {"params": {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3), "stem": jnp.full((2,), 7.0)},
           "opt_state": {"m": jnp.zeros((4, 3))}}
  with caplog.at_level(logging.INFO):
    step, state = loop.restore_or_init(_Empty(), _Program(fresh), None, str(tmp_path / "src"),
                                       ("params",), partial=True)
  assert step == 0
  np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 2.0))
  np.testing.assert_array_equal(state["params"]["b"], np.arange(3.0))
  np.testing.assert_array_equal(state["params"]["stem"], np.full((2,), 7.0))  # fresh
  np.testing.assert_array_equal(state["opt_state"]["m"], np.zeros((4, 3)))  # not a named key
  assert any("initialised 2 arrays" in r.message and "params/stem" in r.message
             for r in caplog.records)


def test_another_shape_or_nothing_shared_is_a_one_line_error(tmp_path):
  _save(tmp_path / "src", {"params": {"w": jnp.ones((4, 3))}})
  wider = {"params": {"w": jnp.zeros((4, 5))}}
  with pytest.raises(ckpt_lib.CheckpointMismatch, match=r"params/w is \(4, 3\)") as e:
    loop.restore_or_init(_Empty(), _Program(wider), None, str(tmp_path / "src"), ("params",),
                         partial=True)
  assert "\n" not in str(e.value)
  other = {"params": {"v": jnp.zeros((4, 3))}}
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="holds none of the config's params"):
    loop.restore_or_init(_Empty(), _Program(other), None, str(tmp_path / "src"), ("params",),
                         partial=True)


def test_a_speech_model_gains_a_head_and_keeps_every_trained_array(tmp_path):
  """The real case: a run without the intermediate CTC head starts one with it."""
  small = ["--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.d_ff=64",
           "--config.model.layers_before_vq=1", "--config.model.layers_after_vq=1",
           "--config.vq.codebook_size=16", "--config.asr.units=32",
           "--config.model.token_rate_layers=0", "--config.asr.inter_ctc_weight=0"]
  path = ROOT / "configs" / "speech_tokenizer_tiny.py"
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))
  before = speech_config.load(path, small)
  old = speech_program.build(before, mesh, 32).init()
  _save(tmp_path / "src", old)
  after = speech_config.load(path, [*small, "--config.asr.inter_ctc_weight=0.5",
                                    f"--config.train.init_from={tmp_path / 'src'}",
                                    "--config.train.init_partial=True"])
  prog = speech_program.build(after, mesh, 32)
  _, state = loop.restore_or_init(_Empty(), prog, None, after.train.init_from, ("params", "vq"),
                                  partial=after.train.init_partial)
  name = ckpt_lib.leaf_name
  was = {name(p): x for p, x in jax.tree_util.tree_flatten_with_path(old["params"])[0]}
  now = {name(p): x for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  new = sorted(set(now) - set(was))
  assert new and all("inter" in k for k in new), new
  for k, x in was.items():
    np.testing.assert_array_equal(now[k], x, err_msg=k)
  for a, b in zip(jax.tree.leaves(state["vq"]), jax.tree.leaves(old["vq"])):
    np.testing.assert_array_equal(a, b)


def test_init_partial_needs_init_from():
  with pytest.raises(speech_config.ConfigError, match="init_partial=True needs train.init_from"):
    speech_config.load(ROOT / "configs" / "speech_tokenizer_tiny.py",
                       ["--config.train.init_partial=True"])
