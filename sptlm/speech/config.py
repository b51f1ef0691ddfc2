"""Config of the speech tokenizer: `get_config()` files -> frozen dataclasses, once, at the CLI.

The optimizer (`train`) and mesh (`mesh`) sections are the LM trainer's own `TrainConfig` and
`MeshConfig`, converted by the same `sptlm.config` helpers, so a key means the same thing in
`sptlm train` and `sptlm tokenizer train`.
"""

import dataclasses
import json
import pathlib
import typing

import ml_collections

from sptlm import config as config_lib
from sptlm import config_io
from sptlm.config import (ConfigError, MeshConfig, TrainConfig, check_at_least, check_choice,
                          check_positive, validate_mesh, validate_train)
from sptlm.speech import augment as augment_lib
from sptlm.speech.augment import NOISE_COLORS, AugmentConfig

KIND = "speech_tokenizer"  # the `kind` key of every speech tokenizer config file
POSITIONS = ("sinusoid", "rope")  # model.positions (sptlm.speech.model)
# model.frontend: Whisper's 128-bin log-mel into a trained conv stem, or Google's frozen
# speech_embedding (sptlm.speech.speech_embedding; 32 bins) pre-trained on real speech, its
# output or (speech_embedding_pool4) a finer, less abstract layer of it, or the frozen encoder
# of Moonshine tiny, an ASR model trained on real speech (sptlm.speech.moonshine; 288-d), or
# that and Whisper's log-mel side by side (moonshine_tiny_mel; 288 + 128)
FRONTENDS = ("whisper_mel", "speech_embedding", "speech_embedding_pool4", "moonshine_tiny",
             "moonshine_tiny_mel")
UNIT_TYPES = ("char", "unigram")  # asr.unit_type: SentencePiece model types (sptlm.speech.units)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Whisper-style encoder around the VQ bottleneck (Whisper's key names where they exist)."""

  num_mels: int  # 128, as Whisper v3
  d_model: int
  num_heads: int
  d_ff: int  # Whisper: 4 * d_model
  layers_before_vq: int  # whisper-large-v3 in the paper: 16 of 32
  layers_after_vq: int  # the rest of the encoder: only training (and ASR) runs them
  pool: int  # average pooling of the 50 Hz encoder frames: 4 -> 12.5 Hz
  block_causal_seconds: float  # 0: bidirectional; > 0: block-causal attention (paper: 4 s)
  causal_stem: bool  # convolutions see only the past (the paper's streaming variant)
  max_seconds: float  # positions of one window (Whisper: 30 s); longer audio is chunked
  ctc_upsample: int  # the layers above the VQ run at this many frames per token (CTC room)
  dtype: str  # compute dtype
  param_dtype: str
  init_std: float
  # > 0: the layers below the VQ attend only this far each way, so a token depends on a bounded
  # stretch of audio (with positions="sinusoid", also on its position in the window)
  attention_window_seconds: float = 0.0
  conv_kernel: int = 0  # > 0 (odd): a Conformer convolution module in every layer (not Whisper)
  # the first this many of layers_after_vq run at the token rate (12.5 Hz, a quarter of the cost
  # of a 50 Hz layer); a per-phase projection then makes the ctc_upsample frames of each token
  token_rate_layers: int = 0
  # positions below the VQ: "sinusoid" (Whisper's absolute embedding: a token depends on where
  # it sits in its window) or "rope" (rotary, relative: with attention_window_seconds, chunked
  # and whole-file tokens agree)
  positions: str = "sinusoid"
  # > 0: each mel bin minus its mean over this many seconds of audio around the frame (sliding
  # cepstral-mean-style normalization): a fixed colour of the voice, vocoder or microphone (a
  # constant offset per bin) is gone before the encoder sees it; a token then depends on audio
  # up to half of it further away
  mel_norm_seconds: float = 0.0
  # "moonshine_tiny_mel" only, training only: the share of utterances whose log-mel stem is left
  # out of the sum (modality dropout), so the layers must also read the words from Moonshine's
  # features alone; the log-mel carries what the training engines share and a new voice does
  # not (BENCHMARKS.md, run 18). Evaluation and tokens always use both stems
  mel_stem_dropout: float = 0.0
  # what turns audio into the encoder's 50 Hz input (FRONTENDS): "whisper_mel" (log-mel ->
  # conv1 -> conv2) or "speech_embedding" (32-bin log-mel -> a frozen CNN pre-trained on real
  # speech, 96-d at 12.5 Hz -> layer norm -> one linear map per 50 Hz phase) or
  # "moonshine_tiny" (Moonshine's frozen ASR encoder, 288-d -> 50 Hz -> layer norm -> linear)
  # or "moonshine_tiny_mel" (both stems summed: Moonshine's, and a 128-bin log-mel's convs)
  frontend: str = "whisper_mel"


@dataclasses.dataclass(frozen=True)
class VQConfig:
  """EMA vector quantizer at 12.5 Hz."""

  codebook_size: int  # K: 16,384 at full scale
  ema_decay: float  # 0.99 in the paper
  commitment_weight: float  # beta of the commitment loss ||h - sg(e)||^2
  restart_after: int  # a code unused for this many steps is re-seeded from the batch
  warmup_steps: int  # steps in which the layers above see the unquantized encoder output
  code_dim: int = 0  # > 0: quantize a projection to this many dimensions (factorized codes)
  normalize: bool = False  # quantize on the unit sphere (cosine similarity)


@dataclasses.dataclass(frozen=True)
class AsrConfig:
  """The CTC head above the bottleneck: SentencePiece units of normalized transcripts."""

  unit_type: str  # "char" (letters) or "unigram" (SentencePiece subwords)
  units: int  # unit vocabulary size, at most (the head has units + 1 outputs: + blank)
  text_tokenizer: str  # a SentencePiece model; "" trains one on the training transcripts
  inter_ctc_weight: float = 0.0  # > 0: + this x a CTC loss on the 50 Hz frames below the VQ
  # training-time dropout above the bottleneck: on the code vectors and in each layer's residual
  # branches (attention, convolution, MLP) of token_rate_layers and layers_after_vq. Those
  # layers fit their training sentences far better than new ones (BENCHMARKS.md, run 15);
  # the tokens are untouched (the encoder and the VQ see no dropout)
  dropout: float = 0.0
  # > 0: a head learns to guess each token's TTS engine (the manifest's `engine`; clips without
  # one are left out) from the encoder output below the VQ, and the encoder to leave it unsure
  # (cross-entropy to the uniform over the batch's engines, ramped in over training, after
  # Ganin & Lempitsky 2015 and Tzeng et al. 2015): this x (head loss + ramp x confusion loss).
  # The encoder is pushed to drop what tells the engines apart. Training only; not in tokens.
  engine_adversary_weight: float = 0.0
  # transcription: CTC prefix beam search with a word n-gram LM (sptlm.speech.ctc_decode) trained
  # at the start of training on the corpus's lm_text.txt (else its training transcripts) and
  # lm_text: text files or directories of *.txt (`sptlm tokenizer fetch-lm-text`); a file that
  # overlaps the held-out sentences is left out whole (sptlm.speech.lm_text)
  lm_order: int = 3  # 0: no language model, greedy CTC decoding
  lm_text: tuple[str, ...] = ()
  beam: int = 32
  lm_alpha: float = 0.7  # weight of the LM log-probability of each word
  lm_beta: float = 1.0  # bonus per word (counters the LM's preference for fewer words)


@dataclasses.dataclass(frozen=True)
class SpeechDataConfig:
  """Where the audio comes from and how it is batched."""

  corpus: str  # build-corpus dir, a manifest (.jsonl / .tsv), or tfds:NAME[/CONFIG]
  train_split: str
  eval_splits: tuple[str, ...]  # evaluated (WER) every eval_every steps
  batch_seconds: float  # padded audio per global batch
  bucket_seconds: tuple[float, ...]  # padded lengths; longer utterances are left out
  short_first: bool  # first epoch from the shortest bucket up (SortaGrad), then shuffled
  eval_every: int
  eval_utterances: int  # per eval split (0: all)
  cache_dir: str  # TFDS exports and the feature cache ("": WORKDIR/cache)
  tune_split: str = ""  # at the end of training, choose lm_alpha / lm_beta on it ("": keep)
  augment: AugmentConfig = AugmentConfig()  # training audio only (sptlm.speech.augment); off
  # keep a slow front end's features (moonshine_tiny) per clip under cache_dir/features when
  # augmentation is off (sptlm.speech.feature_cache)
  cache_features: bool = True


@dataclasses.dataclass(frozen=True)
class SpeechTokenizerConfig:
  """A whole tokenizer experiment."""

  kind: str
  name: str
  model: EncoderConfig
  vq: VQConfig
  asr: AsrConfig
  data: SpeechDataConfig
  train: TrainConfig
  mesh: MeshConfig


def from_config_dict(cfg: ml_collections.ConfigDict | dict) -> SpeechTokenizerConfig:
  raw = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  if raw.get("kind") != KIND:
    raise ConfigError(f"config key 'kind' must be {KIND!r} for a speech tokenizer config, "
                      f"got {raw.get('kind')!r}")
  if isinstance(raw.get("mesh"), dict) and "rules" in raw["mesh"]:
    raw["mesh"] = dict(raw["mesh"], rules=config_io.normalize_rules(raw["mesh"]["rules"]))
  c = config_io.convert(raw, SpeechTokenizerConfig, "")
  validate(c)
  return c


def validate_augment(a: AugmentConfig) -> None:
  """Probabilities in [0, 1], ranges with min <= max, and the values each effect can use."""
  for effect in ("speed", "noise", "reverb", "telephone", "gain", "clip", "warp",
                 "eq", "voice"):
    p = getattr(a, f"{effect}_prob")
    if not 0.0 <= p <= 1.0:
      raise ConfigError(f"data.augment.{effect}_prob={p} must be within 0..1")
  for name in ("speed", "noise_snr_db", "reverb_rt60", "reverb_wet", "gain_db", "clip_level",
               "warp", "voice_formant", "voice_pitch", "voice_range", "voice_duration"):
    low, high = getattr(a, f"{name}_min"), getattr(a, f"{name}_max")
    if low > high:
      raise ConfigError(f"data.augment.{name}_min={low} must be at most "
                        f"data.augment.{name}_max={high}")
  check_positive("data.augment.speed_min", a.speed_min)
  check_positive("data.augment.warp_min", a.warp_min)
  for key in ("voice_formant_min", "voice_pitch_min", "voice_duration_min"):
    check_positive(f"data.augment.{key}", getattr(a, key))
  check_at_least("data.augment.voice_range_min", a.voice_range_min, 0.0)  # 0: monotone
  check_at_least("data.augment.eq_db", a.eq_db, 0.0)
  for key in ("freq_masks", "freq_mask_bins", "time_masks", "time_mask_frames"):
    check_at_least(f"data.augment.{key}", getattr(a, key), 0)
  if not 0.0 <= a.time_mask_ratio <= 1.0:
    raise ConfigError(f"data.augment.time_mask_ratio={a.time_mask_ratio} must be within 0..1")
  check_positive("data.augment.reverb_rt60_min", a.reverb_rt60_min)
  check_positive("data.augment.clip_level_min", a.clip_level_min)
  check_at_least("data.augment.reverb_wet_min", a.reverb_wet_min, 0.0)
  if a.reverb_wet_max > 1.0 or a.clip_level_max > 1.0:
    raise ConfigError(f"data.augment.reverb_wet_max={a.reverb_wet_max} and "
                      f"data.augment.clip_level_max={a.clip_level_max} must be at most 1")
  if not a.noise_colors:
    raise ConfigError("data.augment.noise_colors is empty; give some of: "
                      f"{', '.join(NOISE_COLORS)}")
  for color in a.noise_colors:
    check_choice("data.augment.noise_colors", color, NOISE_COLORS)


def validate(c: SpeechTokenizerConfig) -> None:
  """Value and cross-field checks the types cannot express; sizes first, so the cross-field
  checks never divide by zero."""
  m, v, a, d, t = c.model, c.vq, c.asr, c.data, c.train
  for key in ("num_mels", "d_model", "num_heads", "d_ff", "pool", "ctc_upsample"):
    check_at_least(f"model.{key}", getattr(m, key), 1)
  for key in ("layers_before_vq", "layers_after_vq"):
    check_at_least(f"model.{key}", getattr(m, key), 0)
  check_choice("model.positions", m.positions, POSITIONS)
  check_choice("model.frontend", m.frontend, FRONTENDS)
  check_choice("model.dtype", m.dtype, config_lib.DTYPES)
  check_choice("model.param_dtype", m.param_dtype, config_lib.DTYPES)
  check_positive("model.max_seconds", m.max_seconds)
  check_choice("asr.unit_type", a.unit_type, UNIT_TYPES)
  validate_train(t)
  validate_mesh(c.mesh)
  if m.d_model % m.num_heads:
    raise ConfigError(f"model.d_model={m.d_model} must be a multiple of "
                      f"model.num_heads={m.num_heads}")
  if m.positions == "rope" and (m.d_model // m.num_heads) % 2:
    raise ConfigError(f"model.positions='rope' rotates pairs of dims: the head width "
                      f"model.d_model / model.num_heads = {m.d_model // m.num_heads} must be even")
  token_s = 0.02 * m.pool
  if m.block_causal_seconds < 0 or (m.block_causal_seconds and
                                    abs(m.block_causal_seconds / token_s
                                        - round(m.block_causal_seconds / token_s)) > 1e-6):
    raise ConfigError(f"model.block_causal_seconds={m.block_causal_seconds} must be 0 or a "
                      f"multiple of one token ({token_s} s)")
  w = m.attention_window_seconds
  if w < 0 or (w and abs(w / 0.02 - round(w / 0.02)) > 1e-6):
    raise ConfigError(f"model.attention_window_seconds={w} must be 0 or a multiple of one "
                      "50 Hz frame (0.02 s)")
  n = m.mel_norm_seconds
  if n < 0 or (n and abs(n / 0.02 - round(n / 0.02)) > 1e-6):
    raise ConfigError(f"model.mel_norm_seconds={n} must be 0 (off) or a multiple of 0.02 s (a "
                      "whole number of 10 ms frames each way)")
  if n and (m.block_causal_seconds or m.causal_stem):
    raise ConfigError(f"model.mel_norm_seconds={n} looks ahead as far as back: set it to 0 for "
                      "a causal encoder (block_causal_seconds, causal_stem)")
  if m.frontend.startswith("speech_embedding"):
    if m.num_mels != 32:
      raise ConfigError(f"model.num_mels={m.num_mels}: model.frontend={m.frontend!r} reads "
                        "32 mel bins; set model.num_mels=32")
    if m.mel_norm_seconds or m.causal_stem or m.block_causal_seconds:
      raise ConfigError(f"model.frontend={m.frontend!r} sees 380 ms ahead and normalizes "
                        "nothing: set model.mel_norm_seconds=0, model.causal_stem=False and "
                        "model.block_causal_seconds=0")
  if m.frontend.startswith("moonshine_tiny"):
    hybrid = m.frontend == "moonshine_tiny_mel"
    width = 288 + 128 if hybrid else 288
    if m.num_mels != width:
      raise ConfigError(f"model.num_mels={m.num_mels}: model.frontend={m.frontend!r} gives "
                        f"{width}-d features; set model.num_mels={width}")
    if m.causal_stem or m.block_causal_seconds:
      raise ConfigError(f"model.frontend={m.frontend!r} encodes 5.12 s blocks with 1.28 s of "
                        "context: set model.causal_stem=False and model.block_causal_seconds=0")
    if m.mel_norm_seconds and not hybrid:
      raise ConfigError(f"model.mel_norm_seconds={m.mel_norm_seconds}: model.frontend="
                        "'moonshine_tiny' has no log-mel to normalize; set it to 0 (or use "
                        "'moonshine_tiny_mel')")
  if not 0.0 <= m.mel_stem_dropout < 1.0:
    raise ConfigError(f"model.mel_stem_dropout={m.mel_stem_dropout} must be within [0, 1)")
  if m.mel_stem_dropout and m.frontend != "moonshine_tiny_mel":
    raise ConfigError(f"model.mel_stem_dropout={m.mel_stem_dropout}: model.frontend="
                      f"{m.frontend!r} has no second stem to leave out; set it to 0 (or use "
                      "'moonshine_tiny_mel')")
  if m.conv_kernel < 0 or (m.conv_kernel and m.conv_kernel % 2 == 0):
    raise ConfigError(f"model.conv_kernel={m.conv_kernel} must be 0 (off) or odd")
  if not 0 <= m.token_rate_layers <= m.layers_after_vq:
    raise ConfigError(f"model.token_rate_layers={m.token_rate_layers} must be within 0.."
                      f"model.layers_after_vq={m.layers_after_vq}")
  check_at_least("vq.codebook_size", v.codebook_size, 2)
  if not 0.0 < v.ema_decay < 1.0:
    raise ConfigError(f"vq.ema_decay={v.ema_decay} must be in (0, 1)")
  check_at_least("vq.commitment_weight", v.commitment_weight, 0.0)
  check_at_least("vq.restart_after", v.restart_after, 1)
  check_at_least("vq.warmup_steps", v.warmup_steps, 0)
  check_at_least("vq.code_dim", v.code_dim, 0, " (0: the model width)")
  check_at_least("asr.units", a.units, 8)
  check_at_least("asr.inter_ctc_weight", a.inter_ctc_weight, 0.0)
  if not 0.0 <= a.dropout < 1.0:
    raise ConfigError(f"asr.dropout={a.dropout} must be within [0, 1)")
  check_at_least("asr.engine_adversary_weight", a.engine_adversary_weight, 0.0)
  check_at_least("asr.lm_order", a.lm_order, 0, " (0: no language model, greedy decoding)")
  check_at_least("asr.beam", a.beam, 1)
  if a.inter_ctc_weight > 0 and m.pool < m.ctc_upsample:
    raise ConfigError(f"asr.inter_ctc_weight > 0 needs model.pool={m.pool} >= model.ctc_upsample="
                      f"{m.ctc_upsample}: the frames below the pooling must fit the CTC labels")
  if d.tune_split and d.tune_split == d.train_split:
    raise ConfigError(f"data.tune_split={d.tune_split!r} is the training split: decoding "
                      "weights must be chosen on held-out audio (a build-corpus `dev` split)")
  if not d.bucket_seconds or list(d.bucket_seconds) != sorted(d.bucket_seconds):
    raise ConfigError(f"data.bucket_seconds={d.bucket_seconds} must be increasing")
  check_positive("data.bucket_seconds[0]", d.bucket_seconds[0])
  if max(d.bucket_seconds) > m.max_seconds:
    raise ConfigError(f"data.bucket_seconds goes to {max(d.bucket_seconds)} s, above "
                      f"model.max_seconds={m.max_seconds}")
  if d.batch_seconds < max(d.bucket_seconds):
    raise ConfigError(f"data.batch_seconds={d.batch_seconds} must hold one utterance of the "
                      f"longest bucket ({max(d.bucket_seconds)} s)")
  check_at_least("data.eval_every", d.eval_every, 1)
  check_at_least("data.eval_utterances", d.eval_utterances, 0, " (0: all)")
  validate_augment(d.augment)
  if c.model.frontend != "whisper_mel" and augment_lib.features_enabled(d.augment):
    raise ConfigError(f"data.augment's feature effects (warp, eq, frequency and time masks) "
                      f"act on Whisper's 128-bin log-mel, not model.frontend="
                      f"{c.model.frontend!r}'s features: set data.augment.warp_prob=0, "
                      "eq_prob=0, freq_masks=0 and time_masks=0")
  if d.augment.enabled and d.augment.mel_only:
    if c.model.frontend != "moonshine_tiny_mel":
      raise ConfigError(f"data.augment.mel_only needs model.frontend='moonshine_tiny_mel' (the "
                        f"log-mel beside Moonshine's features), not {c.model.frontend!r}")
    if d.augment.speed_prob > 0 or d.augment.voice_prob > 0:
      raise ConfigError("data.augment.mel_only keeps Moonshine's features of the clean audio, "
                        "so the audio must keep its length: set data.augment.speed_prob=0 and "
                        "data.augment.voice_prob=0")
  if t.microbatches != 1:
    raise ConfigError(f"train.microbatches={t.microbatches}: the speech tokenizer batches by "
                      "length buckets; lower data.batch_seconds instead")
  if t.warmup_steps >= t.steps:
    raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be below train.steps={t.steps}")


def load(path: str | pathlib.Path, overrides: typing.Sequence[str] = ()) -> SpeechTokenizerConfig:
  """File + `--config.KEY=VALUE` overrides -> frozen config."""
  cfg = config_io.load_config_file(path)
  config_io.apply_overrides(cfg, list(overrides), SpeechTokenizerConfig)
  return from_config_dict(cfg)


def to_json(c: SpeechTokenizerConfig) -> str:
  return json.dumps(dataclasses.asdict(c), indent=2)


def from_json(text: str) -> SpeechTokenizerConfig:
  return from_config_dict(json.loads(text))
