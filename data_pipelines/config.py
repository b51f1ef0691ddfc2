"""The data pipeline's config: vocabulary, text-to-token model, interleaving and the mixture.

A `kind = "data"` config file (configs/data_tiny.py) with get_config(); `sptlm data inspect`
reads it. Every key is checked at load time with a one-line error that names it.
"""

import dataclasses
import pathlib

import ml_collections

from sptlm import config as config_lib
from sptlm import config_io
from sptlm.config import ConfigError, check_at_least, check_choice, check_positive

KIND = "data"
TASK_KINDS = ("text", "interleaved", "speech", "asr", "tts")
TEXT_KINDS = ("text", "interleaved")  # documents; the others read token JSON lines


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  kind: str  # one of TASK_KINDS
  # text, interleaved: local or gs:// text (blank-line separated) or .jsonl {"text"} files;
  # speech, asr, tts: JSON lines {"tokens"} / {"text", "tokens"} (see tasks.py)
  files: tuple[str, ...]
  rate: float  # share of the mixture's *tokens* (shares are rate / sum of rates; mixture.py)
  shards: int = 4  # ArrayRecord shards `sptlm data materialize` writes for this task


@dataclasses.dataclass(frozen=True)
class DataVocabConfig:
  text_tokenizer: str  # SentencePiece .model or a Hugging Face tokenizer folder
  text_size: int  # the tokenizer's ids, up to padding (checked)
  speech_size: int  # the speech tokenizer's codebook
  speech_tokenizer: str = ""  # a `sptlm tokenizer train` work dir: tokenizes audio records
  # A base model's adopted ids, as in the LM config's vocab section (sptlm.config.VocabConfig;
  # copy them from `sptlm convert from-hf`'s config.py): -1 / () keep sptlm's own layout.
  speech_offset: int = -1
  special_offset: int = -1
  special_ids: tuple[tuple[str, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class InterleaveConfig:
  lam: float  # Poisson mean of a span's length, in LM text tokens (paper: 10)
  eta: float  # fraction of a document's LM tokens turned into speech (paper: 0.3)
  seed: int
  t2t: str  # a `sptlm t2t train` work directory
  batch: int  # documents per t2t call (all their spans in one synthesize call)


@dataclasses.dataclass(frozen=True)
class DataPipelineConfig:
  name: str
  kind: str
  vocab: DataVocabConfig
  interleave: InterleaveConfig
  tasks: tuple[TaskSpec, ...]


def load(path: str | pathlib.Path, overrides: list[str] = ()) -> DataPipelineConfig:
  cfg = config_io.load_config_file(path)
  config_io.apply_overrides(cfg, list(overrides), DataPipelineConfig)
  raw = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  if raw.get("kind") != KIND:
    raise ConfigError(f"config kind {raw.get('kind')!r} is not a data config (kind = "
                      f"{KIND!r}); use configs/data_tiny.py or a file like it")
  if isinstance(raw.get("tasks"), dict):  # {name: {...}} reads better in a config file
    raw["tasks"] = [dict(spec, name=name) for name, spec in raw["tasks"].items()]
  c = config_io.convert(raw, DataPipelineConfig, "")
  validate(c)
  return c


def validate(c: DataPipelineConfig) -> None:
  check_at_least("vocab.text_size", c.vocab.text_size, 1)
  check_at_least("vocab.speech_size", c.vocab.speech_size, 1)
  config_lib.validate_vocab_ids(c.vocab)
  check_positive("interleave.lam", c.interleave.lam)
  if not 0.0 < c.interleave.eta < 1.0:
    raise ConfigError(f"interleave.eta={c.interleave.eta} must be in (0, 1)")
  check_at_least("interleave.batch", c.interleave.batch, 1)
  if not c.tasks:
    raise ConfigError("tasks is empty: name at least one task")
  for t in c.tasks:
    check_choice(f"tasks.{t.name}.kind", t.kind, TASK_KINDS)
    check_positive(f"tasks.{t.name}.rate", t.rate)
    check_at_least(f"tasks.{t.name}.shards", t.shards, 1)
    if not t.files:
      raise ConfigError(f"tasks.{t.name}.files is empty: give its "
                        f"{'text' if t.kind in TEXT_KINDS else 'token JSON lines'} files")
    if t.kind == "interleaved" and not c.interleave.t2t:
      raise ConfigError(f"tasks.{t.name} is interleaved: set interleave.t2t to a `sptlm t2t "
                        "train` work directory")
