"""Config of the text-to-token model: `get_config()` files -> frozen dataclasses, once.

The model, vocabulary, optimizer and mesh sections are the LM's own (`sptlm.config`): the t2t
model *is* the spine's decoder LM, over [text units, <|begin_of_audio|>, speech codes,
<|end_of_audio|>]. `vocab.text_size` is the number of text units (characters) and
`vocab.speech_size` the speech tokenizer's codebook size; `data` and `synth` are t2t's own.
"""

import dataclasses
import json
import pathlib
import typing

import ml_collections

from sptlm import config as config_lib
from sptlm import config_io
from sptlm.t2t import units as units_lib
from sptlm.config import (ConfigError, MeshConfig, ModelConfig, TrainConfig, VocabConfig,
                          check_at_least, check_choice, check_positive, validate_mesh, validate_train)

KIND = "t2t"  # the `kind` key of every t2t config file


@dataclasses.dataclass(frozen=True)
class T2TDataConfig:
  """Where the TTS pairs (transcript, speech codes) come from, and how they are batched."""

  # A speech tokenizer work directory: it makes the pairs from `corpus` and fixes the codebook.
  tokenizer: str
  # A built corpus (sptlm tokenizer build-corpus) or an audio manifest; "" with `pairs`.
  corpus: str
  # Pre-tokenized JSON lines {"text", "tokens"} (files or directories of *.jsonl); when set,
  # no audio is read. Default: the pairs the run made from `corpus` (WORKDIR/pairs).
  pairs: tuple[str, ...]
  train_split: str
  eval_split: str  # held-out sentences for the round-trip WER ("" for none)
  seq_len: int  # packed training rows of this many tokens
  global_batch_size: int  # rows per step
  max_text_units: int  # longer transcripts are left out of training (counted)
  max_speech_tokens: int  # longer utterances are left out of training (counted)
  # "characters" or "sentencepiece:N" (trained on the training transcripts); see units.py
  text_units: str = "characters"


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  """Defaults of synthesis (T2T.synthesize and `sptlm t2t synthesize`)."""

  batch_size: int  # rows per decode call; batches are padded to it, so it never recompiles
  temperature: float  # 0: greedy
  top_p: float
  # The most speech tokens a text may get: max_tokens_per_unit x its normalized characters
  # + max_extra (characters whatever data.text_units is).
  max_tokens_per_unit: float
  max_extra_tokens: int
  prompt_bucket: int  # prompt widths are rounded up to a multiple of this (few compilations)
  max_text_units: int  # longer texts are split at sentence boundaries, synthesized, joined
  # "static": length-sorted batches, each decoded until its longest row stops; "continuous": a
  # stopped row's slot takes the next text at once (BENCHMARKS.md compares them).
  batching: str = "static"


@dataclasses.dataclass(frozen=True)
class T2TConfig:
  """A whole text-to-token experiment."""

  name: str
  kind: str
  model: ModelConfig
  vocab: VocabConfig
  data: T2TDataConfig
  synth: SynthConfig
  train: TrainConfig
  mesh: MeshConfig


def load(path: str | pathlib.Path, overrides: list[str] = ()) -> T2TConfig:
  """File + overrides -> frozen T2TConfig."""
  cfg = config_io.load_config_file(path)
  config_io.apply_overrides(cfg, list(overrides), T2TConfig)
  return from_config_dict(cfg)


def from_config_dict(cfg: ml_collections.ConfigDict | dict) -> T2TConfig:
  raw = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  if raw.get("kind") != KIND:
    raise ConfigError(f"config kind {raw.get('kind')!r} is not a t2t config (kind = {KIND!r}); "
                      "use configs/t2t_tiny.py or a file like it")
  if isinstance(raw.get("mesh"), dict) and "rules" in raw["mesh"]:
    raw["mesh"] = dict(raw["mesh"], rules=config_io.normalize_rules(raw["mesh"]["rules"]))
  c = config_io.convert(raw, T2TConfig, "")
  validate(c)
  return c


def validate(c: T2TConfig) -> None:
  """Cross-field checks; every message names its key."""
  config_lib.validate_model(c.model, c.data.seq_len)
  validate_train(c.train)
  validate_mesh(c.mesh)
  d, s = c.data, c.synth
  for key in ("seq_len", "global_batch_size", "max_text_units", "max_speech_tokens"):
    check_at_least(f"data.{key}", getattr(d, key), 1)
  if d.max_text_units + d.max_speech_tokens + 2 > d.seq_len:
    raise ConfigError(f"data.seq_len={d.seq_len} must hold the longest pair: "
                      f"data.max_text_units + data.max_speech_tokens + 2 = "
                      f"{d.max_text_units + d.max_speech_tokens + 2}")
  if not d.pairs and not (d.tokenizer and d.corpus):
    raise ConfigError("data.pairs is empty: give pre-tokenized pairs, or data.tokenizer (a "
                      "speech tokenizer work directory) and data.corpus to make them")
  try:
    units_lib.parse(d.text_units)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  check_at_least("synth.batch_size", s.batch_size, 1)
  check_at_least("synth.temperature", s.temperature, 0.0)
  if not 0.0 < s.top_p <= 1.0:
    raise ConfigError(f"synth.top_p={s.top_p} must be in (0, 1]")
  check_positive("synth.max_tokens_per_unit", s.max_tokens_per_unit)
  check_at_least("synth.max_extra_tokens", s.max_extra_tokens, 0)
  check_at_least("synth.prompt_bucket", s.prompt_bucket, 1)
  check_at_least("synth.max_text_units", s.max_text_units, 8)
  check_choice("synth.batching", s.batching, ("static", "continuous"))


def to_json(c: T2TConfig) -> str:
  return json.dumps(dataclasses.asdict(c), indent=2)


def from_json(text: str) -> T2TConfig:
  return from_config_dict(json.loads(text))


_ = typing  # (annotations above are resolved by sptlm.config_io.convert)
