"""A trained speech-text LM for evaluation: continuation log-likelihoods, batched and jitted.

Rows are padded to a fixed batch and to lengths in steps of 32, so a run compiles once per
length bucket. A context longer than the model's training length (data.seq_len) less the
continuation is cut from the left (counted by the caller), so every token is scored at
positions the model was trained on.
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
from sptlm import paths
from sptlm.config import Config
from sptlm.errors import MissingFileError
from sptlm.model import transformer

BUCKET = 32


@dataclasses.dataclass
class LanguageModel:
  cfg: Config
  step: int
  model: Any  # transformer.Transformer
  tokenizer: TextTokenizer
  vocab: Vocabulary

  @classmethod
  def load(cls, workdir: str) -> "LanguageModel":
    """The newest checkpoint of a `sptlm train` work directory, and its text tokenizer."""
    from sptlm.train import checkpoint as checkpoint_lib
    from sptlm.train import program as program_lib
    wd = epath.Path(workdir)
    if not (wd / "config.json").exists():
      raise MissingFileError(f"{wd} is not a `sptlm train` work directory (no config.json)")
    cfg = config_lib.from_json((wd / "config.json").read_text())
    tokenizer = text_input.load_tokenizer(paths.resolve(cfg.vocab.text_tokenizer),
                                          cfg.vocab.text_size)
    step, state = checkpoint_lib.load_newest(
        str(wd), lambda mesh: program_lib.build(cfg, mesh).abstract_state)
    vocab = Vocabulary(cfg.vocab.text_size, cfg.vocab.speech_size)
    abstract = nnx.eval_shape(lambda: transformer.build(cfg.model, vocab.size, 0))
    graphdef, params = nnx.split(abstract, nnx.Param)
    params.replace_by_pure_dict(jax.device_get(state["params"]))
    return cls(cfg, step, nnx.merge(graphdef, params), tokenizer, vocab)

  @functools.cached_property
  def _score(self):
    graphdef, state = nnx.split(self.model)

    @jax.jit
    def score(state, tokens_BxL, positions_BxL, segments_BxL, targets_BxL):
      logits = nnx.merge(graphdef, state)(tokens_BxL, positions_BxL, segments_BxL)
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]

    return functools.partial(score, state)

  def max_length(self) -> int:
    return self.cfg.data.seq_len

  def continuation_nlls(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                        batch: int = 16, desc: str = "scoring") -> list[np.ndarray]:
    """Per-token NLL of each continuation given its context (ids; the context already cut to
    fit max_length)."""
    out: list[np.ndarray] = [np.zeros(0)] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for start in tqdm(range(0, len(order), batch), desc=desc, unit="batch", leave=False,
                      mininterval=0.5 if sys.stderr.isatty() else 30.0):
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
      nll = np.asarray(self._score(tokens, positions, segments, targets))
      for r, i in enumerate(rows):
        ctx, cont = len(pairs[i][0]), len(pairs[i][1])
        out[i] = nll[r, ctx - 1:ctx - 1 + cont]  # target j is token j + 1
    return out
