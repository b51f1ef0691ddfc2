"""`sptlm convert verify`: the sptlm checkpoint and the Hugging Face model on the same inputs.

Both run in float32 (parameters widened; the sptlm reference attention; transformers' eager
attention), so what differs is the conversion, not the compute dtype. Three inputs: text (the
tokenizer's ids of a few sentences), speech (seeded random speech tokens) and mixed (text,
<|begin_of_audio|>, speech, <|end_of_audio|>, text). For each: the max absolute logit
difference, the mean per-token KL(p_hf || p_sptlm), and how often the top-1 tokens agree. A
Hugging Face text LM with fewer ids than sptlm's vocabulary (the source of an import) is
compared on text only, over its own ids.
"""

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.vocabulary import Vocabulary
from sptlm import paths
from sptlm.config import Config
from sptlm.convert import ConversionError, checkpoints
from sptlm.model import transformer

TEXT = ("The quick brown fox jumps over the lazy dog. First Citizen: Before we proceed any "
        "further, hear me speak. All: Speak, speak. You are all resolved rather to die than to "
        "famish? 1234 + 5678 = 6912.")


@dataclasses.dataclass(frozen=True)
class Row:
  kind: str
  tokens: int
  max_abs_diff: float
  mean_kl: float
  top1_agreement: float


def format_rows(rows: list[Row]) -> str:
  lines = [f"{'input':<8}{'tokens':>8}{'max |dlogit|':>15}{'mean KL':>12}{'top-1 agree':>14}"]
  for r in rows:
    lines.append(f"{r.kind:<8}{r.tokens:>8}{r.max_abs_diff:>15.3e}{r.mean_kl:>12.3e}"
                 f"{r.top1_agreement:>14.4f}")
  return "\n".join(lines)


def sptlm_logits_fn(workdir: str, step: int | None = None
                    ) -> tuple[Config, Callable[[np.ndarray], np.ndarray]]:
  """The run's config and a float32 forward: token ids [B, L] -> logits [B, L, V]."""
  cfg = checkpoints.read_config(workdir)
  reader = checkpoints.ParamReader(workdir, step)
  checkpoints.check_shapes(cfg, reader.shapes, str(reader.path))
  params = checkpoints.unflatten({p: reader.read(p).astype(np.float32) for p in reader.shapes})
  reader.close()
  return cfg, forward_fn(cfg, params)


def forward_fn(cfg: Config, params: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
  """A float32 reference-attention forward of `cfg`'s model with these parameters."""
  model_cfg = dataclasses.replace(cfg.model, attention="reference", attention_chunk=0,
                                  dtype="float32", param_dtype="float32", remat="none")
  size = checkpoints.vocabulary(cfg).size
  graphdef, state = nnx.split(nnx.eval_shape(lambda: transformer.build(model_cfg, size, 0)),
                              nnx.Param)
  state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))

  @jax.jit
  def run(state: nnx.State, tokens: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(tokens)

  return lambda tokens: np.asarray(run(state, jnp.asarray(tokens, jnp.int32)))


def inputs(cfg: Config, encode: Callable[[str], list[int]], length: int = 96, seed: int = 0
           ) -> dict[str, np.ndarray]:
  """Text, speech and mixed id sequences, each [1, length] (one compile for all three)."""
  vocab: Vocabulary = checkpoints.vocabulary(cfg)
  ids = encode(TEXT)
  text = np.resize(np.asarray(ids, np.int64), length)  # repeats the text if it is short
  out = {"text": text}
  if vocab.speech_size:
    rng = np.random.default_rng(seed)
    speech = vocab.speech_id(rng.integers(0, vocab.speech_size, length))
    third = length // 3
    mixed = np.concatenate([
        text[:third], [vocab.special_id("<|begin_of_audio|>")], speech[:length - 2 * third - 2],
        [vocab.special_id("<|end_of_audio|>")], text[third:2 * third]])
    out.update(speech=speech, mixed=mixed)
  return {k: v[None, :].astype(np.int64) for k, v in out.items()}


def compare_logits(kind: str, hf_BxLxV: np.ndarray, ours_BxLxV: np.ndarray) -> Row:
  a = hf_BxLxV.astype(np.float64).reshape(-1, hf_BxLxV.shape[-1])
  b = ours_BxLxV.astype(np.float64).reshape(-1, ours_BxLxV.shape[-1])
  log_p = a - _logsumexp(a)
  log_q = b - _logsumexp(b)
  kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
  return Row(kind, a.shape[0], float(np.max(np.abs(a - b))), float(np.mean(kl)),
             float(np.mean(a.argmax(-1) == b.argmax(-1))))


def _logsumexp(x: np.ndarray) -> np.ndarray:
  m = x.max(axis=-1, keepdims=True)
  return m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _text_encoder(cfg: Config, hf_dir: pathlib.Path) -> Callable[[str], list[int]]:
  from sptlm.convert import lineage
  if any((hf_dir / n).exists() for n in lineage.TOKENIZER_FILES):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=False)
    return lambda s: tok(s, add_special_tokens=False)["input_ids"]
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=str(paths.resolve(cfg.vocab.text_tokenizer)))
  return lambda s: sp.encode(s)


def load_hf(hf_dir: str) -> Any:
  """The transformers model in float32, from safetensors only, without custom code."""
  try:
    import torch
    from transformers import AutoModelForCausalLM
  except ImportError as e:
    raise ConversionError(f"sptlm convert verify needs PyTorch and transformers ({e.name} is "
                          "missing): pip install 'sptlm[convert]' torch==2.13.0") from None
  path = pathlib.Path(hf_dir)
  if not (path / "config.json").is_file():
    raise ConversionError(f"{path / 'config.json'} not found: --hf must be a Hugging Face folder")
  try:
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", use_safetensors=True,
        trust_remote_code=False)
  except (OSError, ValueError) as e:
    raise ConversionError(f"{path}: {str(e).splitlines()[0][:200]}") from None
  return model.eval()


def hf_logits(model: Any, tokens_BxL: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.from_numpy(tokens_BxL)).logits.float().numpy()


def compare(workdir: str, hf_dir: str, step: int | None = None) -> list[Row]:
  """One Row per input kind; text only when the HF model has only text ids."""
  cfg, ours = sptlm_logits_fn(workdir, step)
  model = load_hf(hf_dir)
  hf_vocab = model.config.vocab_size
  size = checkpoints.vocabulary(cfg).size
  if hf_vocab > size:
    raise ConversionError(f"the Hugging Face model has {hf_vocab} ids, more than the sptlm "
                          f"model's {size}: they are not the same model")
  rows = []
  for kind, tokens in inputs(cfg, _text_encoder(cfg, pathlib.Path(hf_dir))).items():
    if hf_vocab < size and kind != "text":
      continue  # a text LM has no speech ids
    rows.append(compare_logits(kind, hf_logits(model, tokens), ours(tokens)[..., :hf_vocab]))
  return rows
