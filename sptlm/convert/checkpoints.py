"""sptlm's side of a conversion: a workdir's config and parameters, one tensor at a time.

Reading restores single leaves of the `state` item (Orbax partial restore, as numpy on the
host), so a checkpoint saved sharded over any mesh converts on one machine holding only the
leaf at hand. Writing makes a step-0 checkpoint that `train.init_from` loads: the parameters
and a fresh (zero) optimizer state shaped like the trainer's.
"""

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from sptlm import config as config_lib
from sptlm import paths
from sptlm.config import Config
from sptlm.convert import ConversionError
from sptlm.model import transformer
from sptlm.train import optimizer as optimizer_lib
from data_pipelines.vocabulary import Vocabulary

Path = tuple[str, ...]


def read_config(workdir: str) -> Config:
  """The resolved config a run wrote to DIR/config.json."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise ConversionError(f"{path} not found: --workdir must be a run directory of sptlm train "
                          "(or the output of sptlm convert from-hf)")
  try:
    return config_lib.from_json(path.read_text())
  except config_lib.ConfigError as e:
    raise ConversionError(f"{path}: {e}") from None


def latest_step(workdir: str) -> int:
  directory = paths.absolute(workdir) / "checkpoints"  # Orbax wants absolute paths
  if not directory.exists():
    raise ConversionError(f"{directory} not found: the workdir holds no checkpoints")
  manager = ocp.CheckpointManager(directory,
                                  options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise ConversionError(f"{directory} holds no finished checkpoint")
  return step


def vocabulary(cfg: Config) -> Vocabulary:
  """The run's token layout, an adopted one (vocab.speech_offset, ...) included."""
  return Vocabulary.from_config(cfg.vocab)


def abstract_params(cfg: Config) -> dict[str, Any]:
  """The parameter tree of `cfg`'s model as ShapeDtypeStructs (nothing allocated)."""
  vocab = vocabulary(cfg)
  model = nnx.eval_shape(lambda: transformer.build(cfg.model, vocab.size, 0))
  return nnx.split(model, nnx.Param)[1].to_pure_dict()


def flatten(tree: dict[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  out: dict[Path, Any] = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def unflatten(flat: dict[Path, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


class ParamReader:
  """The `params` of one checkpoint step, restored a leaf at a time as numpy arrays.

  Orbax's partial restore reads only the named leaf. (One layer of a stacked leaf cannot be
  read more cheaply: Orbax's zarr chunks span every layer, so a slice decodes the whole leaf.)
  """

  def __init__(self, workdir: str, step: int | None = None):
    self.step = latest_step(workdir) if step is None else step
    self.path = paths.absolute(workdir) / "checkpoints" / str(self.step) / "state"
    if not self.path.exists():
      raise ConversionError(f"{self.path} not found (no step {self.step} in {workdir})")
    self._handler = ocp.PyTreeCheckpointHandler()
    tree = self._handler.metadata(self.path).tree
    if "params" not in tree:
      raise ConversionError(f"{self.path} holds no 'params': not an sptlm train state")
    self.shapes = {p: (tuple(m.shape), np.dtype(m.dtype))
                   for p, m in flatten(tree["params"]).items()}

  def read(self, path: Path) -> np.ndarray:
    if path not in self.shapes:
      raise ConversionError(f"{self.path}: no parameter {'/'.join(path)}")
    item = unflatten({path: 0})
    args = unflatten({path: ocp.RestoreArgs(restore_type=np.ndarray)})
    restored = self._handler.restore(self.path, args=ocp.args.PyTreeRestore(
        item={"params": item}, restore_args={"params": args}, partial_restore=True))
    node = restored["params"]
    for key in path:
      node = node[key]
    return np.asarray(node)

  def close(self) -> None:
    self._handler.close()


def check_shapes(cfg: Config, shapes: dict[Path, tuple[tuple[int, ...], np.dtype]],
                 source: str) -> None:
  """The checkpoint's parameters are exactly those of `cfg`'s model."""
  want = {p: tuple(s.shape) for p, s in flatten(abstract_params(cfg)).items()}
  have = {p: s for p, (s, _) in shapes.items()}
  for path in sorted(set(want) | set(have)):
    if want.get(path) != have.get(path):
      raise ConversionError(
          f"{source}: parameter {'/'.join(path)} is {have.get(path)} in the checkpoint but "
          f"{want.get(path)} in its config.json; the two do not belong together")


def write_init(out: str, cfg: Config, params: dict[Path, np.ndarray]) -> str:
  """A step-0 checkpoint in OUT that `train.init_from=OUT` loads; returns its directory.

  `params` (flat) is emptied as the leaves move into jax arrays, which Orbax writes without a
  host copy (it copies numpy leaves, all at once). The trainer restores the whole train state
  for init_from, so a zero optimizer state goes along: one zero array per distinct parameter
  shape, shared by every moment of that shape. Peak: twice the parameters, plus one leaf.
  """
  directory = paths.absolute(out) / "checkpoints"
  if directory.exists() and any(directory.iterdir()):
    raise ConversionError(f"{directory} already holds checkpoints; choose an empty --out")
  flat = {}
  for path in list(params):
    flat[path] = jax.device_put(params.pop(path)).block_until_ready()
  optimizer = optimizer_lib.make(cfg.train)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params(cfg))
  zeros: dict[tuple[tuple[int, ...], Any], jax.Array] = {}

  def zero(s: jax.ShapeDtypeStruct) -> jax.Array:
    key = (tuple(s.shape), np.dtype(s.dtype))
    if key not in zeros:
      zeros[key] = jax.numpy.zeros(s.shape, s.dtype)
    return zeros[key]

  state = {"step": jax.numpy.zeros((), np.int32), "params": unflatten(flat),
           "opt_state": jax.tree.map(zero, abstract_opt)}
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False))
  config_json = config_lib.to_json(cfg)
  manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          config=ocp.args.JsonSave(json.loads(config_json))),
               force=True)
  manager.wait_until_finished()
  manager.close()
  (epath.Path(out) / "config.json").write_text(config_json)
  return str(directory / "0")
