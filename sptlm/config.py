"""Experiment configs: `get_config()` files, command-line overrides, frozen dataclasses.

A config file returns an `ml_collections.ConfigDict`; the CLI applies `--config.KEY=VALUE`
overrides and converts it once (sptlm.config_io) into the frozen dataclasses below. Every key
must be known and every value of the declared type, so a typo fails at start-up, not mid-run.
"""

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import ml_collections

from sptlm import config_io
from sptlm.errors import ConfigError

# The names a fixed-choice key accepts. The code that acts on them keeps its own tables
# (sptlm.model.transformer.REMAT_POLICIES, attention.BACKENDS, DTYPES); tests check they agree,
# so loading a config never imports the model or jax.
REMAT_NAMES = ("none", "full", "dots", "dots_no_batch", "attention_out")
ATTENTION_BACKENDS = ("reference", "pallas")
ROPE_STYLES = ("rotate_half", "interleaved")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("linear", "cosine")
MESH_AXES = ("data", "fsdp", "tensor")
PALLAS_BLOCK = 128  # the fused kernel's blocks are multiples of this


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer shape and numerics (Llama family, with GLM-4 / Qwen2 options)."""

  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  rope_theta: float
  rope_fraction: float  # share of each head's dims that rotate (GLM-4: 0.5)
  rope_style: str  # "rotate_half" (Llama, Qwen2) or "interleaved" (GLM-4)
  qkv_bias: bool  # biases on q/k/v projections (Qwen2, GLM-4)
  tie_embeddings: bool
  norm_eps: float
  attention: str  # "reference" (pure JAX) or "pallas" (fused kernel)
  attention_chunk: int  # reference backend: query block size; 0 computes all at once
  loss_chunk: int  # logits and cross-entropy in sequence blocks of this size; 0: all at once
  attention_block_q: int  # pallas backend: query rows per kernel block (multiple of 128)
  attention_block_kv: int  # pallas backend: keys per kernel block (multiple of 128)
  scan_layers: bool
  remat: str  # a name in sptlm.model.transformer.REMAT_POLICIES
  dtype: str  # compute dtype
  param_dtype: str
  init_std: float


@dataclasses.dataclass(frozen=True)
class VocabConfig:
  """Token id layout; see data_pipelines.vocabulary."""

  text_size: int
  speech_size: int
  # A SentencePiece .model file or a Hugging Face tokenizer folder (tokenizer.json); relative
  # paths are from the sptlm checkout. Its size must be text_size up to padding.
  text_tokenizer: str
  # A base model's own ids (e.g. GLM-4-Voice-9B's; `sptlm convert from-hf` reads them from its
  # tokenizer): <|audio_0|>, the first of the specials it lacks, and (token, id) of those it
  # has. -1 / (): sptlm's layout, speech then specials after the text ids.
  speech_offset: int = -1
  special_offset: int = -1
  special_ids: tuple[tuple[str, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The LM's input: materialized mixture shards (`shards`), or else a text corpus."""

  corpus: str  # a text file (blank-line separated documents), used when `shards` is empty
  seq_len: int
  global_batch_size: int
  packing_bins: int  # first-fit packing considers this many open sequences at once (per shard)
  num_shards: int  # independent data streams; hosts own contiguous shards (see text_input)
  shards: str = ""  # an `sptlm data materialize --output` directory (or, small runs: a data
  #                   config .py, built in the training process): the task mixture
  rates: tuple[tuple[str, float], ...] = ()  # {task: token share} over the materialized rates
  workers: int = 0  # grain worker processes per host (0: in the training process)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer, schedule, logging and checkpointing of a run."""

  steps: int
  seed: int
  learning_rate: float
  min_learning_rate: float
  warmup_steps: int  # linear warmup; capped at steps - 1 so a short run still decays
  schedule: str  # "linear" or "cosine" decay to min_learning_rate
  b1: float
  b2: float
  eps: float
  weight_decay: float
  clip_norm: float
  microbatches: int  # gradient accumulation: the global batch is split into this many
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  async_checkpoints: bool
  init_from: str  # a checkpoint directory to start from ("" for random init)
  # length of the learning-rate plan; 0: train.steps (see README: extending a run)
  schedule_steps: int = 0
  # with init_from: arrays the checkpoint lacks (a new stem or head) keep their fresh init;
  # those it has must still match in shape (False: the checkpoint must fit exactly)
  init_partial: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh and the logical-to-mesh axis rules (one rule per logical name)."""

  data: int
  fsdp: int
  tensor: int
  rules: tuple[tuple[str, tuple[str, ...]], ...]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """`sptlm eval`'s model-side choices, and evaluation during training (README: Evaluation).

  The spoken QA prompt is `qa_prompt` with {question} replaced by the question (text ids, or
  <|begin_of_audio|> codes <|end_of_audio|>), then `qa_text_answer` or `qa_speech_answer` by
  the answer's modality; `<|name|>` special tokens in them are the vocabulary's own ids.
  """

  every: int = 0  # evaluate every this many steps during training (0: never)
  tasks: tuple[tuple[str, str], ...] = ()  # (task, data file) pairs scored during training
  settings: tuple[str, ...] = ("T->T",)  # the settings scored during training
  limit: int = 64  # items per task during training
  t2t: str = ""  # `sptlm t2t train` work dir: speaks text for speech settings
  speech_tokenizer: str = ""  # `sptlm tokenizer train` work dir: audio in, ASR of S->S answers
  batch: int = 16  # rows per scoring or generation call (a multiple of the data-parallel size)
  qa_prompt: str = "Question: {question}\nAnswer:"
  qa_text_answer: str = ""
  qa_speech_answer: str = "<|begin_of_audio|>"
  qa_stop: tuple[str, ...] = ("<|end_of_text|>", "<|end_of_audio|>", "<|user|>")
  qa_max_new_tokens: int = 24  # text answers
  qa_max_new_speech_tokens: int = 64  # speech answers (5 s at 12.5 Hz)


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole experiment."""

  name: str
  model: ModelConfig
  vocab: VocabConfig
  data: DataConfig
  train: TrainConfig
  mesh: MeshConfig
  eval: EvalConfig = EvalConfig()


def from_config_dict(cfg: ml_collections.ConfigDict) -> Config:
  """Validates a ConfigDict and freezes it into a `Config`."""
  raw = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  if "mesh" in raw and isinstance(raw["mesh"], dict) and "rules" in raw["mesh"]:
    raw["mesh"] = dict(raw["mesh"], rules=config_io.normalize_rules(raw["mesh"]["rules"]))
  config = config_io.convert(raw, Config, "")
  validate(config)
  return config


def check_choice(key: str, value: str, allowed: Sequence[str]) -> None:
  """A key with a fixed set of values: one line naming the key, the value and the choices."""
  if value not in allowed:
    raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")


def check_at_least(key: str, value: float, low: float, note: str = "") -> None:
  """A lower bound the code needs (a count, a size, a weight): one line naming key and value."""
  if value < low:
    raise ConfigError(f"{key}={value} must be at least {low}{note}")


def check_positive(key: str, value: float) -> None:
  """A rate, length or norm that the code divides by or scales with: above 0."""
  if not value > 0:
    raise ConfigError(f"{key}={value} must be above 0")


def validate_train(t: TrainConfig) -> None:
  """The optimizer and run keys, shared by `sptlm train` and `sptlm tokenizer train`."""
  check_choice("train.schedule", t.schedule, SCHEDULES)
  for key in ("steps", "log_every", "checkpoint_every", "microbatches"):
    check_at_least(f"train.{key}", getattr(t, key), 1)
  check_at_least("train.keep_checkpoints", t.keep_checkpoints, 2,
                 " so a corrupt latest checkpoint can fall back to the one before")
  check_at_least("train.warmup_steps", t.warmup_steps, 0)
  check_at_least("train.schedule_steps", t.schedule_steps, 0, " (0: train.steps)")
  check_positive("train.learning_rate", t.learning_rate)
  if not 0.0 <= t.min_learning_rate <= t.learning_rate:
    raise ConfigError(f"train.min_learning_rate={t.min_learning_rate} must be within 0.."
                      f"train.learning_rate={t.learning_rate} (the floor the schedule decays to)")
  for key in ("b1", "b2"):
    if not 0.0 <= getattr(t, key) < 1.0:
      raise ConfigError(f"train.{key}={getattr(t, key)} must be in [0, 1) (Adam's decay rate)")
  check_at_least("train.eps", t.eps, 0.0)
  check_at_least("train.weight_decay", t.weight_decay, 0.0)
  check_positive("train.clip_norm", t.clip_norm)
  if t.init_partial and not t.init_from:
    raise ConfigError("train.init_partial=True needs train.init_from (the run to start from)")


def check_mesh_sizes(sizes: dict[str, int]) -> None:
  """Each of mesh.data/fsdp/tensor is a device count or -1 (the devices left over), at most
  one -1; whether they fit the devices is checked when those are known (sharding.mesh_shape)."""
  for axis in MESH_AXES:
    if sizes[axis] < 1 and sizes[axis] != -1:
      raise ConfigError(f"mesh.{axis}={sizes[axis]} must be a positive device count or -1 (the "
                        "devices left over)")
  free = [a for a in MESH_AXES if sizes[a] == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh.{free[0]}=-1 and mesh.{free[1]}=-1: at most one mesh axis may take "
                      f"the devices left over; give mesh.{free[1]} a size (e.g. 1)")


def validate_mesh(mesh: MeshConfig) -> None:
  """Mesh sizes and rules (one rule per logical name, known mesh axes only)."""
  check_mesh_sizes({a: getattr(mesh, a) for a in MESH_AXES})
  names = [n for n, _ in mesh.rules]
  dup = {n for n in names if names.count(n) > 1}
  if dup:
    raise ConfigError(f"mesh.rules names {sorted(dup)[0]!r} twice: one rule per logical name")
  for name, axes in mesh.rules:
    for a in axes:
      if a not in MESH_AXES:
        raise ConfigError(f"mesh.rules[{name!r}] uses unknown mesh axis {a!r}; "
                          f"the mesh axes are: {', '.join(MESH_AXES)}")


def validate_model(m: ModelConfig, seq_len: int) -> None:
  """The model keys (shared by every trainer on the spine's decoder), sizes first."""
  for key in ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "d_ff"):
    check_at_least(f"model.{key}", getattr(m, key), 1)
  check_choice("model.remat", m.remat, REMAT_NAMES)
  check_choice("model.attention", m.attention, ATTENTION_BACKENDS)
  check_choice("model.rope_style", m.rope_style, ROPE_STYLES)
  check_choice("model.dtype", m.dtype, DTYPES)
  check_choice("model.param_dtype", m.param_dtype, DTYPES)
  check_positive("model.rope_theta", m.rope_theta)
  check_at_least("model.norm_eps", m.norm_eps, 0.0)
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} must be a multiple of "
                      f"model.num_kv_heads={m.num_kv_heads}")
  if not 0.0 < m.rope_fraction <= 1.0 or int(m.head_dim * m.rope_fraction) % 2:
    raise ConfigError(f"model.rope_fraction={m.rope_fraction} must give an even number of "
                      f"rotary dims of head_dim={m.head_dim}")
  if m.loss_chunk < 0 or (m.loss_chunk and seq_len % m.loss_chunk):
    raise ConfigError(f"model.loss_chunk={m.loss_chunk} must divide data.seq_len={seq_len} "
                      "(0 computes the logits all at once)")
  check_at_least("model.attention_chunk", m.attention_chunk, 0, " (0: all queries at once)")
  if m.attention == "reference" and 0 < m.attention_chunk < seq_len and (
      seq_len % m.attention_chunk):
    raise ConfigError(f"model.attention_chunk={m.attention_chunk} must divide "
                      f"data.seq_len={seq_len} (0 attends all queries at once)")
  if m.attention == "pallas":
    for key in ("attention_block_q", "attention_block_kv"):
      block = getattr(m, key)
      if block < 1 or block % PALLAS_BLOCK:
        raise ConfigError(f"model.{key}={block} must be a positive multiple of {PALLAS_BLOCK} "
                          "(model.attention='pallas')")


def validate_eval(e: EvalConfig) -> None:
  check_at_least("eval.every", e.every, 0)
  check_at_least("eval.limit", e.limit, 1)
  check_at_least("eval.batch", e.batch, 1)
  check_at_least("eval.qa_max_new_tokens", e.qa_max_new_tokens, 1)
  check_at_least("eval.qa_max_new_speech_tokens", e.qa_max_new_speech_tokens, 1)
  if "{question}" not in e.qa_prompt:
    raise ConfigError(f"eval.qa_prompt={e.qa_prompt!r} needs a {{question}} placeholder")
  if e.every and not e.tasks:
    raise ConfigError("eval.every is set but eval.tasks is empty: give (task, data file) "
                      "pairs, e.g. --config.eval.tasks=\"(('tstorycloze', 'stories.csv'),)\"")


def validate_vocab_ids(v: VocabConfig) -> None:
  """An adopted layout's ids must be known tokens that do not overlap (one line naming them)."""
  from data_pipelines import vocabulary  # numpy only; the layout's own checks

  check_at_least("vocab.speech_offset", v.speech_offset, -1)
  check_at_least("vocab.special_offset", v.special_offset, -1)
  for name, _ in v.special_ids:
    if name not in vocabulary.SPECIAL_TOKENS:
      raise ConfigError(f"vocab.special_ids: {name!r} is not a special token of the layout; "
                        f"known: {', '.join(vocabulary.SPECIAL_TOKENS)}")
  try:
    vocabulary.Vocabulary.of(v.text_size, v.speech_size, speech_offset=v.speech_offset,
                             special_offset=v.special_offset, special_ids=v.special_ids)
  except ValueError as e:
    raise ConfigError(f"vocab.speech_offset/special_offset/special_ids: {e}") from None


def validate(c: Config) -> None:
  """Value and cross-field checks that the types alone cannot express; sizes first, so the
  cross-field checks never divide by zero."""
  v, t, d = c.vocab, c.train, c.data
  check_at_least("data.seq_len", d.seq_len, 1)
  validate_model(c.model, d.seq_len)
  check_at_least("vocab.text_size", v.text_size, 1)
  check_at_least("vocab.speech_size", v.speech_size, 0)
  validate_vocab_ids(v)
  check_at_least("data.global_batch_size", d.global_batch_size, 1)
  check_at_least("data.num_shards", d.num_shards, 1)
  check_at_least("data.workers", d.workers, 0)
  for name, rate in d.rates:
    if rate < 0:
      raise ConfigError(f"data.rates.{name}={rate} must be at least 0")
  validate_train(t)
  validate_mesh(c.mesh)
  validate_eval(c.eval)
  if d.global_batch_size % t.microbatches:
    raise ConfigError(f"data.global_batch_size={d.global_batch_size} must be divisible by "
                      f"train.microbatches={t.microbatches}")
  if d.global_batch_size % d.num_shards:
    raise ConfigError(f"data.num_shards={d.num_shards} must divide "
                      f"data.global_batch_size={d.global_batch_size} (each data stream fills "
                      "an equal share of the batch)")


def load(path: str | pathlib.Path, overrides: list[str] = ()) -> Config:
  """The one entry point: file + overrides -> frozen Config."""
  spath = str(path)
  arg = None
  if ":" in spath and not pathlib.Path(spath).is_file():
    spath, arg = spath.rsplit(":", 1)
  cfg = config_io.load_config_file(spath, arg)
  config_io.apply_overrides(cfg, list(overrides), Config)
  return from_config_dict(cfg)


def to_json(c: Config) -> str:
  """The resolved config as written to DIR/config.json."""
  return json.dumps(dataclasses.asdict(c), indent=2)


def from_json(text: str) -> Config:
  return from_config_dict(ml_collections.ConfigDict(json.loads(text)))
