"""`sptlm convert from-hf`: a Hugging Face text LM -> an sptlm checkpoint for `train.init_from`.

The model section (every families.ARCH_KEYS key) and vocab.text_size come from the Hugging Face
config; the --config run supplies the rest (data, train, mesh, vocab.speech_size, the text
tokenizer, how the model runs: dtypes, remat, attention backend). `derive` lists each derived
key with the --config value it replaces; only a key set explicitly on the command line
(`--config.model.KEY=VALUE`) must agree. OUT/config.py is that derived run, starting from OUT.

Every tensor is copied exactly (a transpose and a reshape; bfloat16 widens to float32 without
rounding). A folder in the original ChatGLM layout (model_type "chatglm": THUDM/glm-4-9b,
glm-4-voice-9b) is read without its custom code and imported as the GLM family
(sptlm.convert.chatglm splits its fused tensors). A tensor that is missing, has no place in the
model or is not an unquantized float is refused by name before anything is written.

A tokenizer that already has `<|audio_0|>` .. (GLM-4-Voice's) dictates the vocabulary layout
too: vocab.speech_size, speech_offset and the specials it has keep its ids and rows
(`data_pipelines.vocabulary.adopt`); only the specials it lacks get new rows, in its unused
padding rows when they fit.

The embedding (and an untied output matrix) grows from the text ids to the padded sptlm
vocabulary: speech tokens, specials and padding rows. Each new row is drawn from
N(mu, 1e-9 * Sigma), mu and Sigma the mean and covariance of that matrix's text rows in float64
(Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language Models"; transformers'
`resize_token_embeddings(mean_resizing=True)` does the same). So every new row is the average
text row plus a tiny, correlated, seeded perturbation (train.seed) that breaks their symmetry:
a new token's logit starts at the average text logit, below the log-partition, so the text
distribution moves by little until training teaches the new rows. If Sigma is singular the
rows are exactly mu.
"""

import dataclasses
import os
import pathlib
import pprint
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
from etils import epath

from data_pipelines import vocabulary
from sptlm import config as config_lib
from sptlm.config import Config
from sptlm.convert import ConversionError, chatglm, checkpoints, families, layout, lineage
from sptlm.convert import safetensors_io
from sptlm.convert import tokenizer as tokenizer_lib

NEW_ROWS = ("mean + N(0, 1e-9 * covariance) of the text rows, per matrix, float64 statistics, "
            "seeded by train.seed (Hewitt 2021; transformers mean_resizing)")
COVARIANCE_SCALE = 1e-9
CONFIG_FILE = "config.py"

_CONFIG_PY = '''\
"""The run that starts from the checkpoint beside this file (written by sptlm convert from-hf).

  sptlm train --config {path} --workdir runs/{name}

The --config run with the model section and vocab.text_size of {source}
and train.init_from set to this directory. Edit anything but the model's shape keys.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {body})
'''


@dataclasses.dataclass(frozen=True)
class Derivation:
  """What from-hf imports: the family, and the --config run with the model's own shape keys."""

  source: pathlib.Path
  family: families.Family
  config: Config
  rows: tuple[families.Derived, ...]
  glm_source: chatglm.Source | None = None  # the original ChatGLM layout, else transformers'

  def summary(self) -> str:
    layout_note = " (ChatGLM layout)" if self.glm_source else ""
    return "\n".join([
        f"sptlm convert from-hf: {self.family.architecture}{layout_note} from {self.source}",
        f"  model      from {self.source / 'config.json'} (--config value -> Hugging Face "
        "value where they differ):",
        *(f"    {row}" for row in self.rows)])


@dataclasses.dataclass(frozen=True)
class ImportReport:
  text_size: int
  vocab_size: int
  tensors: int
  checkpoint: str
  config_file: str
  name: str
  adopted: bool = False  # the layout of a tokenizer that already has the speech tokens
  reinitialized: tuple[str, ...] = ()  # its missing specials, placed in its unused padding rows

  def summary(self) -> str:
    if self.adopted:
      placed = (f"{', '.join(self.reinitialized)} in unused rows and "
                if self.reinitialized else "")
      rows = (f"  vocabulary {self.text_size} rows copied (speech tokens and specials at the "
              f"tokenizer's ids); {placed}{self.vocab_size - self.text_size} new rows: "
              f"{NEW_ROWS}")
    else:
      rows = (f"  vocabulary {self.text_size} text ids copied, {self.vocab_size - self.text_size} "
              f"new rows (speech, specials, padding): {NEW_ROWS}")
    return "\n".join([
        rows,
        f"  tensors    {self.tensors} copied exactly",
        f"  checkpoint {self.checkpoint}",
        f"  config     {self.config_file} (the run above, train.init_from set to it)",
        f"  use it     sptlm train --config {self.config_file} --workdir runs/{self.name}",
    ])


def pinned(overrides: Sequence[str]) -> frozenset[str]:
  """The dotted keys that `--config.KEY=VALUE` overrides set (as config.apply_overrides reads)."""
  return frozenset(o.removeprefix("--").removeprefix("config.").split("=", 1)[0]
                   for o in overrides)


def new_rows(text_rows: np.ndarray, count: int, rng: np.random.Generator,
             block: int = 8192) -> np.ndarray:
  """`count` rows from N(mean, 1e-9 * covariance) of `text_rows` [T, D] (float64 statistics)."""
  t, d = text_rows.shape
  mean = np.zeros(d, np.float64)
  for start in range(0, t, block):
    mean += text_rows[start:start + block].astype(np.float64).sum(axis=0)
  mean /= t
  cov = np.zeros((d, d), np.float64)
  for start in range(0, t, block):
    centered = text_rows[start:start + block].astype(np.float64) - mean
    cov += centered.T @ centered
  cov /= t
  try:
    chol = np.linalg.cholesky(COVARIANCE_SCALE * cov)
  except np.linalg.LinAlgError:  # singular (e.g. fewer text rows than dims): the mean alone
    return np.broadcast_to(mean, (count, d)).copy()
  return mean + rng.standard_normal((count, d)) @ chol.T


def _check_folder(hf_dir: pathlib.Path) -> None:
  if not (hf_dir / "config.json").is_file():
    raise ConversionError(f"{hf_dir / 'config.json'} not found: --hf must be a Hugging Face "
                          "model folder")


def _load_hf_config(hf_dir: pathlib.Path) -> Any:
  from transformers import AutoConfig

  _check_folder(hf_dir)
  try:
    return AutoConfig.from_pretrained(str(hf_dir), trust_remote_code=False)
  except (ValueError, KeyError, OSError) as e:
    raise ConversionError(f"{hf_dir / 'config.json'}: {str(e).splitlines()[0][:200]}") from None


def derive(hf_dir: str, cfg: Config, explicit: Collection[str] = ()) -> Derivation:
  """`cfg` with the model section and vocab.text_size of the Hugging Face model in `hf_dir`.

  `explicit`: the keys the user set on the command line; those must agree with the model.
  """
  src = pathlib.Path(hf_dir)
  _check_folder(src)
  raw = chatglm.read_config(src)
  glm_source = None
  if raw is not None:  # custom code transformers will not run: read its keys ourselves
    fields, text_size, glm_source = chatglm.model_fields(raw, str(src / "config.json"))
    fam = families.FAMILIES["glm"]
  else:
    fam, fields, text_size = families.from_hf_config(_load_hf_config(src))
  derived, rows = families.derive(cfg, fields, text_size, explicit, str(src),
                                  _vocab_layout(src, cfg, text_size))
  try:
    config_lib.validate(derived)
  except config_lib.ConfigError as e:
    raise ConversionError(f"the --config run with the model of {src}: {e}") from None
  return Derivation(src, fam, derived, rows, glm_source)


def _vocab_layout(src: pathlib.Path, cfg: Config, text_size: int) -> dict[str, Any]:
  """The vocab keys a tokenizer that already has speech tokens dictates (GLM-4-Voice's ids).

  Without `<|audio_0|>` in the tokenizer the layout is sptlm's own (speech and specials after
  the text ids): keys the --config run set otherwise go back to it.
  """
  ids, size = tokenizer_lib.token_ids(src)
  try:
    adopted = vocabulary.adopt(text_size, ids, size)
  except ValueError as e:
    raise ConversionError(f"{src}: {e}") from None
  if adopted is None:
    own = {"speech_offset": -1, "special_offset": -1, "special_ids": ()}
    if all(getattr(cfg.vocab, key) == value for key, value in own.items()):
      return {}
    return own
  # special_ids sorted by token, as a config file's dict of them loads.
  return {"speech_size": adopted.speech_size, "speech_offset": adopted.speech_offset,
          "special_offset": adopted.special_offset, "special_ids": tuple(sorted(adopted.adopted))}


def import_(derivation: Derivation, out: str) -> ImportReport:
  """Writes OUT/config.json, OUT/config.py, OUT/checkpoints/0 and OUT/hf_source/ (lineage)."""
  src, fam, cfg = derivation.source, derivation.family, derivation.config
  text_size = cfg.vocab.text_size
  vocab = checkpoints.vocabulary(cfg)
  reader = safetensors_io.Reader(src)
  ignorable_suffixes = layout.IGNORABLE_SUFFIXES + chatglm.IGNORABLE_SUFFIXES
  reader.check_dtypes([n for n in reader.names if not n.endswith(ignorable_suffixes)])
  if derivation.glm_source is not None:
    tensor_groups = chatglm.groups(cfg.model, derivation.glm_source, text_size)
  else:
    tensor_groups = layout.groups(fam, cfg.model)
  abstract = checkpoints.flatten(checkpoints.abstract_params(cfg))
  params = {p: np.empty(s.shape, s.dtype) for p, s in abstract.items()}
  consumed: set[str] = set()

  def read(name: str) -> np.ndarray:
    consumed.add(name)
    return reader.read(name)

  for group in tensor_groups:
    targets = []
    for path in group.leaves:
      if path == layout.EMBED:
        targets.append(params[path][:text_size])  # views: the text rows
      elif path == layout.LM_HEAD:
        targets.append(params[path][:, :text_size])
      else:
        targets.append(params[path])
    try:
      group.load(read, targets)
    except ConversionError:
      raise
    except ValueError as e:
      raise ConversionError(f"{src}: {', '.join(group.hf_names[:1])}...: shape does not match "
                            f"the config.json ({e})") from None
  ignorable = ({"lm_head.weight"} if cfg.model.tie_embeddings and derivation.glm_source is None
               else set())
  unused = [n for n in reader.names if n not in consumed and n not in ignorable
            and not n.endswith(ignorable_suffixes)]
  if unused:
    raise ConversionError(f"{src}: tensor {unused[0]!r} (and {len(unused) - 1} more) has no "
                          "place in the sptlm model; it is not a supported architecture")

  # New rows: past the model's rows, and an adopted layout's block of specials the base lacks
  # when it sits in the base's unused padding rows (then the rows below it are those its
  # tokenizer uses, and give the statistics).
  inside = vocab.specials if vocab.is_adopted and vocab.special_start < text_size else ()
  block = slice(vocab.special_start, vocab.special_start + len(inside))
  stats_rows = vocab.special_start if inside else text_size
  added = vocab.size - text_size
  embed = params[layout.EMBED]
  rows = new_rows(embed[:stats_rows], len(inside) + added, np.random.default_rng(
      [cfg.train.seed, 0]))
  embed[block], embed[text_size:] = rows[:len(inside)], rows[len(inside):]
  if not cfg.model.tie_embeddings:
    head = params[layout.LM_HEAD]
    rows = new_rows(head[:, :stats_rows].T, len(inside) + added, np.random.default_rng(
        [cfg.train.seed, 1])).T
    head[:, block], head[:, text_size:] = rows[:, :len(inside)], rows[:, len(inside):]
    del head
  del embed, targets, rows  # write_init frees each leaf as it moves it: hold no other reference

  tensors = len(consumed)
  # Orbax takes only absolute paths; write_init empties params.
  step_dir = checkpoints.write_init(_absolute(out), cfg, params)
  config_file = write_config_py(out, cfg, str(src.resolve()))
  lineage.write(out, str(src), {
      "family": fam.name, "architecture": fam.architecture, "source": str(src.resolve()),
      "layout": "chatglm" if derivation.glm_source is not None else "transformers",
      "text_size": text_size, "vocab_size": vocab.size, "new_rows": NEW_ROWS,
      "seed": cfg.train.seed, "reinitialized_rows": list(range(block.start, block.stop))})
  return ImportReport(text_size, vocab.size, tensors, step_dir, str(config_file), cfg.name,
                      vocab.is_adopted, tuple(inside))


def _absolute(out: str) -> str:
  return out if "://" in out else os.path.abspath(os.path.expanduser(out))


def write_config_py(out: str, cfg: Config, source: str) -> epath.Path:
  """OUT/config.py: `cfg` as a get_config() file with train.init_from=OUT, for `sptlm train`."""
  init_from = _absolute(out)
  raw = dataclasses.asdict(dataclasses.replace(
      cfg, train=dataclasses.replace(cfg.train, init_from=init_from)))
  raw["mesh"]["rules"] = {name: axes or None for name, axes in cfg.mesh.rules}  # as configs/ do
  path = epath.Path(out) / CONFIG_FILE
  body = pprint.pformat(raw, width=92, sort_dicts=False).replace("\n", "\n      ")
  path.write_text(_CONFIG_PY.format(path=epath.Path(init_from) / CONFIG_FILE, name=cfg.name,
                                    source=source, body=body))
  return path
