"""A Hugging Face folder written by `sptlm convert to-hf`, read back as an sptlm model to evaluate.

The folder holds everything but the run's own config: the model's math comes from config.json
(families.from_hf_config, the inverse of to-hf's hf_config_kwargs), the id layout from the
tokenizer's added tokens (`<|audio_0|>` is the first speech id, `<|begin_of_audio|>` the first
special; an adopted layout, whose speech tokens do not run up to sptlm's specials, keeps each
special at its own id and counts all the model's rows as text), the training length from
max_position_embeddings, the compute dtype from the file's dtype (as transformers runs it), and
how sptlm runs the model (attention backend, mesh rules) from configs/tiny.py. Every tensor goes
back through the export's own layout.groups, widened to float32; a tensor missing, extra or
misshapen is refused before any is read. to-hf records no training step, so the model reports
step 0. Nothing is written.
"""

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from etils import epath

from data_pipelines import text_tokenizer as text_tokenizer_lib
from data_pipelines.vocabulary import SPECIAL_TOKENS, Vocabulary
from sptlm import config as config_lib
from sptlm import paths
from sptlm.config import Config
from sptlm.convert import ConversionError, checkpoints, families, from_hf, layout
from sptlm.convert import safetensors_io, tokenizer
from sptlm.errors import MissingFileError

if TYPE_CHECKING:
  from sptlm.eval.lm import LanguageModel

# How sptlm runs a model that came without a run config: only its non-math keys are used.
BASE_CONFIG = paths.ROOT / "configs" / "tiny.py"
RUN_KEYS = ("model", "vocab", "train")  # the top-level keys of a `sptlm train` config.json


def _read_json(path: epath.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def is_hf_folder(path: epath.Path | str) -> bool:
  """Whether `sptlm eval` should read `path` as a Hugging Face folder rather than a run.

  A config.json that is not JSON counts when safetensors weights sit beside it, so `load`
  names the broken file instead of the workdir reader failing on it.
  """
  folder = epath.Path(path)
  if not (folder / "config.json").exists():
    return False
  config = _read_json(folder / "config.json")
  if config is None:
    return any(folder.glob("*.safetensors"))
  return (isinstance(config, dict) and ("architectures" in config or "model_type" in config)
          and not all(key in config for key in RUN_KEYS))


class TextPart(text_tokenizer_lib.HuggingFaceTokenizer):
  """The exported tokenizer without its speech and special tokens (ids from `text_size` on),
  so text encodes as the run's own text tokenizer encodes it; the Vocabulary places the rest."""

  def __init__(self, path: str, text_size: int):
    from tokenizers import Tokenizer
    super().__init__(path)
    spec = json.loads(self.tok.to_str())
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < text_size]
    self.tok = Tokenizer.from_str(json.dumps(spec))


def _special_start(tok: Any, file: epath.Path) -> int:
  """The id of the first sptlm special (renamed `<|sptlm_...|>` when the text tokenizer had it)."""
  first = SPECIAL_TOKENS[0]
  for name in (first, f"<|sptlm_{first.strip('<|>')}|>"):
    i = tok.token_to_id(name)
    if i is not None:
      return i
  raise ConversionError(f"{file} has no {first} token: not a folder written by sptlm convert "
                        "to-hf (its speech and special tokens are missing)")


def _speech_run(tok: Any) -> tuple[int | None, int]:
  """(id of `<|audio_0|>` or None, how many `<|audio_k|>` follow it at consecutive ids)."""
  start = tok.token_to_id(tokenizer.speech_token(0))
  if start is None:
    return None, 0
  size = 1
  while tok.token_to_id(tokenizer.speech_token(size)) == start + size:
    size += 1
  return start, size


def _is_sptlm_block(tok: Any, start: int) -> bool:
  """Whether all of sptlm's specials (or their `<|sptlm_...|>` names) sit in order from `start`."""
  for j, name in enumerate(SPECIAL_TOKENS):
    ids = {tok.token_to_id(n) for n in (name, f"<|sptlm_{name.strip('<|>')}|>")}
    if start + j not in ids:
      return False
  return True


def vocabulary(hf_dir: epath.Path, vocab_size: int) -> dict[str, Any]:
  """The vocab keys of the exported id layout (sptlm.config.VocabConfig's), checked against
  config.json: sptlm's own (speech straight after the text ids, then the specials), or an
  adopted one (a base model's, e.g. GLM-4-Voice's: speech and specials at its ids)."""
  file = hf_dir / "tokenizer.json"
  if not file.exists():
    raise MissingFileError(f"{file} not found: sptlm eval reads the tokenizer that sptlm "
                           "convert to-hf writes beside the weights")
  tok = text_tokenizer_lib.HuggingFaceTokenizer(str(hf_dir)).tok
  speech_start, speech_size = _speech_run(tok)
  own = speech_start is None or _is_sptlm_block(tok, speech_start + speech_size)
  if own:
    special_start = _special_start(tok, file)
    text_size = special_start if speech_start is None else speech_start
    speech_size = special_start - text_size
    # The speech tokens fill the ids between: the last one sits just below the first special.
    if speech_size < 0 or (speech_size and tok.token_to_id(
        tokenizer.speech_token(speech_size - 1)) != special_start - 1):
      raise ConversionError(f"{file}: the speech tokens {tokenizer.speech_token(0)}... do not "
                            f"run up to {SPECIAL_TOKENS[0]} (id {special_start}); re-export "
                            "the run with sptlm convert to-hf")
    fields = {"text_size": text_size, "speech_size": speech_size, "speech_offset": -1,
              "special_offset": -1, "special_ids": ()}
  else:
    # Adopted: every row is the base model's, its speech run and specials at their own ids.
    named = [(name, tok.token_to_id(name)) for name in SPECIAL_TOKENS]
    missing = [name for name, i in named if i is None]
    if missing:
      raise ConversionError(f"{file} has no {missing[0]} token: not a folder written by "
                            "sptlm convert to-hf (its special tokens are missing)")
    fields = {"text_size": vocab_size, "speech_size": speech_size,
              "speech_offset": speech_start, "special_offset": -1,
              "special_ids": tuple(sorted(named))}
  try:
    size = Vocabulary.of(**fields).size
  except ValueError as e:
    raise ConversionError(f"{file}: {e}") from None
  if size != vocab_size:
    raise ConversionError(f"{hf_dir / 'config.json'} vocab_size={vocab_size} but the tokenizer's "
                          f"layout ({fields['text_size']} text, {speech_size} speech ids) needs "
                          f"{size}")
  return fields


def derive_config(hf_dir: epath.Path) -> tuple[Config, families.Family]:
  """The sptlm config of the exported model: math from config.json, the rest from the base."""
  hf = from_hf._load_hf_config(hf_dir)  # noqa: SLF001 - the one reader of HF configs
  fam, fields, vocab_size = families.from_hf_config(hf)
  vocab = vocabulary(hf_dir, vocab_size)
  raw = _read_json(hf_dir / "config.json") or {}
  dtype = "bfloat16" if "bfloat16" in str(raw.get("dtype", raw.get("torch_dtype"))) else "float32"
  base = config_lib.load(BASE_CONFIG)
  cfg, _ = families.derive(base, fields, vocab["text_size"], (), str(hf_dir),
                           vocab_fields={k: v for k, v in vocab.items() if k != "text_size"})
  cfg = dataclasses.replace(
      cfg, name=hf_dir.name,
      model=dataclasses.replace(cfg.model, dtype=dtype, param_dtype="float32"),
      vocab=dataclasses.replace(cfg.vocab, text_tokenizer=str(hf_dir)),
      data=dataclasses.replace(cfg.data, seq_len=int(hf.max_position_embeddings)))
  try:
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise ConversionError(f"{hf_dir / 'config.json'}: {e}") from None
  return cfg, fam


def _hf_shapes(groups: list[layout.Group], abstract: dict[layout.Path, Any]
               ) -> dict[str, tuple[int, ...]]:
  """Each tensor the export writes and its shape, from zero-stride stand-ins (no weights)."""
  def get(path: layout.Path, i: int | None) -> np.ndarray:
    shape = abstract[path].shape
    return np.broadcast_to(np.float32(0), shape if i is None else shape[1:])

  return {name: tuple(a.shape) for g in groups for name, a in g.export(get)}


def _first(names: list[str]) -> str:
  return f"{names[0]!r}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def read_params(hf_dir: epath.Path, cfg: Config, fam: families.Family) -> dict[str, Any]:
  """The model's parameters as a pure nested dict of float32 arrays, the export undone."""
  reader = safetensors_io.Reader(str(hf_dir))
  groups = layout.groups(fam, cfg.model)
  abstract = checkpoints.flatten(checkpoints.abstract_params(cfg))
  want = _hf_shapes(groups, abstract)
  have = set(reader.names)
  missing = sorted(set(want) - have)
  if missing:
    raise ConversionError(f"{hf_dir}: tensor {_first(missing)} is missing from the safetensors "
                          "files; re-export the run with sptlm convert to-hf")
  ignorable = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
  extra = sorted(n for n in have - set(want) - ignorable
                 if not n.endswith(layout.IGNORABLE_SUFFIXES))
  if extra:
    raise ConversionError(f"{hf_dir}: tensor {_first(extra)} has no place in the "
                          f"{fam.architecture} that config.json describes")
  for name, shape in want.items():
    if reader.shape(name) != shape:
      raise ConversionError(f"{hf_dir}: tensor {name!r} is {reader.shape(name)} but config.json "
                            f"makes it {shape}")
  params = {path: np.empty(s.shape, np.float32) for path, s in abstract.items()}
  for group in groups:
    group.load(reader.read, [params[path] for path in group.leaves])
  return checkpoints.unflatten(params)


def load(hf_dir: str, mesh: jax.sharding.Mesh | None = None) -> "LanguageModel":
  """The model of a `sptlm convert to-hf` folder with its text tokenizer, on `mesh`."""
  from sptlm.eval.lm import LanguageModel
  folder = epath.Path(hf_dir)
  cfg, fam = derive_config(folder)
  params = read_params(folder, cfg, fam)
  tok = TextPart(str(folder), cfg.vocab.text_size)
  text_tokenizer_lib.check_size(tok, cfg.vocab.text_size)
  return LanguageModel.from_params(cfg, 0, params, tok, mesh, source=str(hf_dir))
