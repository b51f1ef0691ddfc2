"""A trained speech-text LM for evaluation: continuation log-likelihoods and greedy answers,
batched, jitted and sharded over the mesh like training.

Rows are padded to a fixed batch and to lengths in steps of 32, so a run compiles once per
length bucket. A context longer than the model's training length (data.seq_len) less the
continuation is cut from the left (counted by the caller), so every token is scored at
positions the model was trained on. With a mesh, the parameters keep the training's sharding
(cfg.mesh.rules) and the rows are split over the batch axes; the batch must be a multiple of
the data-parallel size.
"""

import dataclasses
import functools
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from tqdm import tqdm

from data_pipelines import text_input
from data_pipelines.text_tokenizer import TextTokenizer
from data_pipelines.vocabulary import Vocabulary
from sptlm import config as config_lib
from sptlm import paths, sharding
from sptlm.config import Config
from sptlm.errors import InputError, MissingFileError
from sptlm.model import decode, nnx_compat, transformer

BUCKET = 32


def _one_device_mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))


@dataclasses.dataclass
class LanguageModel:
  cfg: Config
  step: int
  model: Any  # transformer.Transformer, its arrays placed on `mesh`
  tokenizer: TextTokenizer
  vocab: Vocabulary
  mesh: jax.sharding.Mesh
  source: str = ""  # where it came from: a work directory or a Hugging Face folder

  @classmethod
  def load(cls, workdir: str, mesh: jax.sharding.Mesh | None = None) -> "LanguageModel":
    """The newest checkpoint of a `sptlm train` work directory (or a Hugging Face folder made
    by `sptlm convert to-hf`), on `mesh` (default: one device)."""
    from sptlm.eval import hf_model
    from sptlm.train import checkpoint as checkpoint_lib
    from sptlm.train import program as program_lib
    wd = epath.Path(workdir)
    if hf_model.is_hf_folder(wd):
      return hf_model.load(str(wd), mesh)
    if not (wd / "config.json").exists():
      raise MissingFileError(f"{wd} is neither a `sptlm train` work directory nor a Hugging "
                             "Face folder (no config.json)")
    cfg = config_lib.from_json((wd / "config.json").read_text())
    tokenizer = text_input.load_tokenizer(paths.resolve(cfg.vocab.text_tokenizer),
                                          cfg.vocab.text_size)
    mesh = mesh or _one_device_mesh()
    step, state = checkpoint_lib.load_newest(
        str(wd), lambda m: program_lib.build(cfg, m).abstract_state, mesh=mesh)
    return cls.from_params(cfg, step, state["params"], tokenizer, mesh, str(wd))

  @classmethod
  def from_params(cls, cfg: Config, step: int, params: Any, tokenizer: TextTokenizer,
                  mesh: jax.sharding.Mesh | None = None, source: str = "") -> "LanguageModel":
    """A model from a pure dict of parameters (host or device arrays), placed on `mesh` with
    the training's parameter sharding."""
    mesh = mesh or _one_device_mesh()
    vocab = Vocabulary.from_config(cfg.vocab)
    abstract = nnx.eval_shape(lambda: transformer.build(cfg.model, vocab.size, 0))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    names = nnx_compat.param_names(abstract_params)
    shardings = jax.tree.map(lambda n: sharding.named(mesh, cfg.mesh.rules, n), names,
                             is_leaf=lambda x: isinstance(x, tuple))
    abstract_params.replace_by_pure_dict(jax.device_put(params, shardings))
    return cls(cfg, step, nnx.merge(graphdef, abstract_params), tokenizer, vocab, mesh, source)

  @property
  def data_parallel(self) -> int:
    """Rows of a batch are split over this many devices."""
    spec = sharding.spec(("batch",), self.cfg.mesh.rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1

  def check_batch(self, batch: int) -> None:
    if batch % self.data_parallel:
      raise InputError(f"eval batch {batch} must be a multiple of the {self.data_parallel} "
                       "data-parallel devices of the mesh; set --batch (eval.batch)")

  def _batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding.named(self.mesh, self.cfg.mesh.rules, ("batch", "length"))

  def max_length(self) -> int:
    return self.cfg.data.seq_len

  def continuation_nlls(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                        batch: int = 16, desc: str = "scoring") -> list[np.ndarray]:
    """Per-token NLL of each continuation given its context (ids; the context already cut to
    fit max_length)."""
    self.check_batch(batch)
    out: list[np.ndarray] = [np.zeros(0)] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for start in _progress(range(0, len(order), batch), desc):
      rows = order[start:start + batch]
      seqs = [list(pairs[i][0]) + list(pairs[i][1]) for i in rows]
      length = -(-max(len(s) - 1 for s in seqs) // BUCKET) * BUCKET
      tokens = np.zeros((batch, length), np.int32)
      targets = np.zeros((batch, length), np.int32)
      segments = np.zeros((batch, length), np.int32)
      positions = np.zeros((batch, length), np.int32)
      for r, s in enumerate(seqs):
        n = len(s) - 1
        tokens[r, :n], targets[r, :n] = s[:-1], s[1:]
        segments[r, :n], positions[r, :n] = 1, np.arange(n)
      rows_in = jax.device_put((tokens, positions, segments, targets), self._batch_sharding())
      graphdef, state = nnx.split(self.model)
      nll = np.asarray(jax.device_get(_score(graphdef, state, *rows_in, mesh=self.mesh,
                                             rules=self.cfg.mesh.rules)))
      for r, i in enumerate(rows):
        ctx, cont = len(pairs[i][0]), len(pairs[i][1])
        out[i] = nll[r, ctx - 1:ctx - 1 + cont]  # target j is token j + 1
    return out

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               stop_tokens: Sequence[int], batch: int = 16, desc: str = "generating"
               ) -> list[list[int]]:
    """Greedy continuations (the stop token included when reached), in input order. Prompts
    are padded to a fixed batch and to lengths in steps of 32 (one compile per bucket)."""
    self.check_batch(batch)
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rows_sharding = self._batch_sharding()
    for start in _progress(range(0, len(order), batch), desc):
      rows = order[start:start + batch]
      width = -(-max(len(prompts[i]) for i in rows) // BUCKET) * BUCKET
      array = np.zeros((batch, width), np.int32)
      lengths = np.ones((batch,), np.int32)  # filler rows: one token, their output unused
      for r, i in enumerate(rows):
        array[r, :len(prompts[i])], lengths[r] = prompts[i], len(prompts[i])
      with sharding.logical_rules(self.mesh, self.cfg.mesh.rules):
        res = decode.generate(self.model, array, lengths=lengths, max_new_tokens=max_new_tokens,
                              rng=jax.random.key(0), temperature=0.0, stop_tokens=stop_tokens,
                              max_len=width + max_new_tokens, batch_sharding=rows_sharding)
      tokens, counts = jax.device_get((res.tokens, res.lengths))
      for r, i in enumerate(rows):
        out[i] = tokens[r, :counts[r]].tolist()
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "rules"))
def _score(graphdef: nnx.GraphDef, state: nnx.State, tokens_BxL: jax.Array,
           positions_BxL: jax.Array, segments_BxL: jax.Array, targets_BxL: jax.Array, *,
           mesh: jax.sharding.Mesh, rules: Any) -> jax.Array:
  """Per-token NLL of the targets; one compile per shape, whichever parameters come in (so a
  periodic eval during training does not recompile)."""
  with sharding.logical_rules(mesh, rules):
    logits = nnx.merge(graphdef, state)(tokens_BxL, positions_BxL, segments_BxL)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]


def _progress(it: Any, desc: str) -> Any:
  return tqdm(it, desc=desc, unit="batch", leave=False,
              mininterval=0.5 if sys.stderr.isatty() else 30.0)
