"""The speech tokenizer as a library: tokens from audio, text from tokens.

  tok = SpeechTokenizer.load("runs/speech_tiny")
  codes = tok.encode([samples_16k])          # [np.int32 array of N codes], N = ceil(S / 1280)
  texts = tok.decode(codes)                  # ASR through the bottleneck, from tokens alone
  texts = tok.transcribe([samples_16k])      # encode + decode

Tokens are raw codebook indices 0..K-1; the offset into an LM vocabulary is added only when
training examples are built (`data_pipelines.vocabulary.Vocabulary.speech_id`).

Any length: the log-mel of a whole file is computed at once (its frames do not depend on the
chunking) and the encoder runs on windows of at most model.max_seconds. A long input is split
into pieces of whole tokens; each piece is encoded with `context` tokens of audio on both
sides and only its own tokens are kept, so chunks neither lose nor repeat a token at an edge.
Windows of all inputs are padded to a few lengths and batched, so a batch job compiles a few
shapes once.
"""

import dataclasses
import json
import logging
import math
import pathlib
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from sptlm.errors import InputError, MissingFileError
from sptlm.paths import local_copy
from sptlm.speech import audio as audio_lib
from sptlm.speech import features
from sptlm.speech import config as config_lib
from sptlm.speech import ctc_decode
from sptlm.speech import model as model_lib
from sptlm.speech import program as program_lib
from sptlm.speech.config import SpeechTokenizerConfig
from sptlm.speech.ctc_decode import NgramLM
from sptlm.speech.input import num_tokens
from sptlm.speech.units import Units

log = logging.getLogger(__name__)
UNITS_FILE = "asr_units.model"
LM_FILE = "asr_lm.arpa"  # optional word n-gram LM (ARPA) for beam-search decoding
DECODING_FILE = "asr_decoding.json"  # lm_alpha / lm_beta chosen on data.tune_split
TOKENS_PER_SECOND = 12.5
_PAD_TOKENS = 32  # window lengths are padded to a multiple of this (few compiled shapes)


@dataclasses.dataclass(frozen=True)
class Window:
  item: int  # which input
  start: int  # window [start, stop) in tokens of that input
  stop: int
  keep_start: int  # the tokens this window contributes: [keep_start, keep_stop)
  keep_stop: int


def plan_windows(num: int, window: int, context: int, item: int = 0,
                 align: int = 1) -> list[Window]:
  """Pieces of at most `window - 2 * context` tokens that partition [0, num), each with up to
  `context` tokens of context on each side (starts aligned to `align` tokens)."""
  if num == 0:
    return []
  if num <= window:
    return [Window(item, 0, num, 0, num)]
  step = (window - 2 * context) // align * align
  if step < 1:
    raise ValueError(f"chunk window of {window} tokens leaves no room beside {context} tokens "
                     "of context on each side")
  out = []
  for a in range(0, num, step):
    b = min(num, a + step)
    out.append(Window(item, max(0, a - context), min(num, b + context), a, b))
  return out


def run_windows(windows: Sequence[Window], inputs: Sequence[np.ndarray], per_token: int,
                fn: Callable[[np.ndarray, np.ndarray], np.ndarray], batch: int,
                max_window: int) -> list[np.ndarray]:
  """Applies `fn(x [B, W * per_token, ...], valid [B, W]) -> [B, W, ...]` to every window,
  batched by padded length, and stitches each input's kept outputs back together in order."""
  pieces: dict[int, list[tuple[int, np.ndarray]]] = {}
  by_len: dict[int, list[Window]] = {}
  for w in windows:
    padded = min(max_window, -(-(w.stop - w.start) // _PAD_TOKENS) * _PAD_TOKENS)
    by_len.setdefault(padded, []).append(w)
  for length, group in sorted(by_len.items()):
    for i in range(0, len(group), batch):
      chunk = group[i:i + batch]
      x0 = inputs[chunk[0].item]
      x = np.zeros((batch, length * per_token, *x0.shape[1:]), x0.dtype)
      valid = np.zeros((batch, length), np.int32)
      for r, w in enumerate(chunk):
        x[r, :(w.stop - w.start) * per_token] = inputs[w.item][w.start * per_token:
                                                               w.stop * per_token]
        valid[r, :w.stop - w.start] = 1
      out = np.asarray(fn(x, valid))
      for r, w in enumerate(chunk):
        kept = out[r, w.keep_start - w.start:w.keep_stop - w.start]
        pieces.setdefault(w.item, []).append((w.keep_start, kept))
  results = []
  for item in range(len(inputs)):
    parts = sorted(pieces.get(item, []), key=lambda p: p[0])
    results.append(np.concatenate([p for _, p in parts]) if parts else np.zeros((0,), np.int32))
  return results


class SpeechTokenizer:
  """A trained tokenizer's encoder (audio -> codes) and its ASR path (codes -> text).

  ASR decoding is greedy CTC, or with a word language model `lm` (and `beam` > 1) CTC prefix
  beam search in which only the LM's words come out (`lexicon`), each scored
  `alpha * ln p_lm + beta` (see sptlm.speech.ctc_decode)."""

  def __init__(self, cfg: SpeechTokenizerConfig, units: Units, params: dict, vq_state: dict, *,
               batch: int = 8, context_seconds: float = 2.0, lm: NgramLM | None = None,
               beam: int | None = None, alpha: float | None = None, beta: float | None = None,
               lexicon: bool = True):
    """beam / alpha / beta default to the config's asr.beam / lm_alpha / lm_beta."""
    self.cfg, self.units = cfg, units
    self.params, self.vq_state = params, vq_state
    self.batch = batch
    beam = cfg.asr.beam if beam is None else beam
    alpha = cfg.asr.lm_alpha if alpha is None else alpha
    beta = cfg.asr.lm_beta if beta is None else beta
    if beam < 1:
      raise InputError(f"beam must be >= 1, not {beam}")
    self.lm, self.beam, self.alpha, self.beta, self.lexicon = lm, beam, alpha, beta, lexicon
    graphdef = nnx_graphdef(cfg, cfg.asr.units)
    self._tokenize, self._logits = program_lib.make_inference(graphdef)
    m = cfg.model
    self.window = int(round(m.max_seconds * TOKENS_PER_SECOND))
    block = round(m.block_causal_seconds * TOKENS_PER_SECOND)
    self.align = block or 1  # block-causal: windows start on block boundaries
    # a windowed encoder's token depends on audio at most receptive_seconds away: give every
    # window at least that much context (its position in the window still matters)
    reach = model_lib.receptive_seconds(m)
    if math.isfinite(reach):
      context_seconds = max(context_seconds, reach)
    context = math.ceil(context_seconds * TOKENS_PER_SECOND - 1e-9)
    self.context = -(-context // self.align) * self.align

  @property
  def codebook_size(self) -> int:
    return self.cfg.vq.codebook_size

  @classmethod
  def load(cls, workdir: str | pathlib.Path, **kwargs) -> "SpeechTokenizer":
    """The newest checkpoint of a `sptlm tokenizer train` work directory, with the language
    model WORKDIR/asr_lm.arpa when there is one (unless `lm=` is given; lm=None: greedy); or
    a `sptlm tokenizer import` directory (an encode-only `WhisperVQTokenizer`)."""
    from sptlm.train import checkpoint as checkpoint_lib
    wd = epath.Path(workdir)
    from sptlm.speech.whisper_vq import tokenizer as whisper_vq  # imports this module
    if whisper_vq.is_imported(wd):  # `sptlm tokenizer import`: a released WhisperVQ encoder
      return whisper_vq.WhisperVQTokenizer.load(wd, **kwargs)
    cfg_path = wd / "config.json"
    if not cfg_path.exists():
      raise MissingFileError(f"{wd} is not a tokenizer work directory (no config.json); "
                             "train one with `sptlm tokenizer train`")
    cfg = config_lib.from_json(cfg_path.read_text())
    units = Units(local_copy(wd / UNITS_FILE))
    if "lm" not in kwargs and (wd / LM_FILE).exists():
      kwargs["lm"] = NgramLM.load_arpa(local_copy(wd / LM_FILE))
      log.info("decoding with the language model %s (%s)", wd / LM_FILE, kwargs["lm"])
    if (wd / DECODING_FILE).exists():  # weights chosen on held-out audio at the end of training
      tuned = json.loads((wd / DECODING_FILE).read_text())
      for key in ("alpha", "beta"):
        kwargs.setdefault(key, float(tuned[key]))
    step, state = checkpoint_lib.load_newest(
        str(wd), lambda mesh: program_lib.build(cfg, mesh, cfg.asr.units).abstract_state)
    log.info("loaded speech tokenizer %s at step %d", wd, step)
    return cls(cfg, units, state["params"], state["vq"], **kwargs)

  # ---- Audio -> tokens ------------------------------------------------------------------

  def features(self, samples: np.ndarray) -> np.ndarray:
    """16 kHz samples -> log-mel [8N, M] of the audio zero-padded to N whole tokens."""
    n = num_tokens(len(samples))
    padded = np.zeros(n * features.SAMPLES_PER_TOKEN, np.float32)
    padded[:len(samples)] = samples
    return features.featurize(padded, self.cfg.model.num_mels, self.cfg.model.frontend)

  def encode(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
    """16 kHz mono float audio -> int32 codes, exactly ceil(len / 1280) per input."""
    mels = [self.features(np.asarray(a, np.float32)) for a in audios]
    windows = [w for i, m in enumerate(mels)
               for w in plan_windows(len(m) // features.FRAMES_PER_TOKEN, self.window,
                                     self.context, i, self.align)]

    def fn(mel_BxFxM: np.ndarray, valid_BxN: np.ndarray) -> np.ndarray:
      return self._tokenize(self.params, self.vq_state, jnp.asarray(mel_BxFxM),
                            jnp.asarray(valid_BxN))

    out = run_windows(windows, mels, features.FRAMES_PER_TOKEN, fn, self.batch, self.window)
    return [o.astype(np.int32) for o in out]

  # ---- Tokens -> text -------------------------------------------------------------------

  def decode(self, codes: Sequence[np.ndarray]) -> list[str]:
    """Codes -> transcripts through the layers above the bottleneck: CTC greedy decoding, or
    beam search with the language model when there is one and beam > 1."""
    seqs, windows = self._code_windows(codes)
    if self.lm is not None and self.beam > 1:
      return ctc_decode.decode_batch(self._log_probs(windows, seqs), self.units, self.lm,
                                     beam=self.beam, alpha=self.alpha, beta=self.beta,
                                     lexicon=self.lexicon)
    up = self.cfg.model.ctc_upsample

    def fn(codes_BxN: np.ndarray, valid_BxN: np.ndarray) -> np.ndarray:
      logits = self._logits(self.params, self.vq_state, jnp.asarray(codes_BxN),
                            jnp.asarray(valid_BxN))
      b, n = codes_BxN.shape
      return jnp.argmax(logits, axis=-1).reshape(b, n, up)  # CTC frames of each token

    best = run_windows(windows, seqs, 1, fn, self.batch, self.window)
    return [self.units.greedy(b.reshape(-1)) for b in best]

  def log_probs(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Codes -> per input, float32 CTC log-posteriors [N * ctc_upsample, asr.units + 1]
    (class 0 blank), e.g. to tune the beam search's alpha and beta."""
    seqs, windows = self._code_windows(codes)
    return self._log_probs(windows, seqs)

  def _code_windows(self, codes: Sequence[np.ndarray]
                    ) -> tuple[list[np.ndarray], list[Window]]:
    seqs = [np.asarray(c, np.int32).reshape(-1) for c in codes]
    for i, s in enumerate(seqs):
      if s.size and (s.min() < 0 or s.max() >= self.codebook_size):
        raise ValueError(f"tokens of item {i} are outside the codebook [0, {self.codebook_size})")
    windows = [w for i, s in enumerate(seqs)
               for w in plan_windows(len(s), self.window, self.context, i, self.align)]
    return seqs, windows

  def _log_probs(self, windows: Sequence[Window], seqs: Sequence[np.ndarray]
                 ) -> list[np.ndarray]:
    up, classes = self.cfg.model.ctc_upsample, self.cfg.asr.units + 1

    def fn(codes_BxN: np.ndarray, valid_BxN: np.ndarray) -> np.ndarray:
      logits = self._logits(self.params, self.vq_state, jnp.asarray(codes_BxN),
                            jnp.asarray(valid_BxN))
      b, n = codes_BxN.shape
      log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      return log_p.reshape(b, n, up, log_p.shape[-1])  # CTC frames of each token

    out = run_windows(windows, seqs, 1, fn, self.batch, self.window)
    return [o.reshape(-1, classes).astype(np.float32) if o.size else
            np.zeros((0, classes), np.float32) for o in out]

  def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
    return self.decode(self.encode(audios))

  # ---- Files ------------------------------------------------------------------------------

  def encode_files(self, files: Sequence[str], *, mix_channels: bool = False,
                   max_seconds: float = 7200.0, group_seconds: float = 600.0
                   ) -> Iterator[dict]:
    """Per file, in input order: {"audio", "seconds", "tokens"[, "warning"]} or
    {"audio", "error"}. Files are encoded in groups of about `group_seconds` of audio; a bad
    file never stops the others."""
    entries: list[tuple[str, audio_lib.Audio | str]] = []
    total = 0.0

    def flush() -> Iterator[dict]:
      nonlocal entries, total
      good = [(i, a) for i, (_, a) in enumerate(entries) if isinstance(a, audio_lib.Audio)]
      codes = dict(zip([i for i, _ in good], self._encode_robust([a for _, a in good])))
      for i, (path, a) in enumerate(entries):
        if isinstance(a, str):
          yield {"audio": path, "error": a}
        elif isinstance(codes[i], str):
          yield {"audio": path, "error": codes[i]}
        else:
          row = {"audio": path, "seconds": round(a.seconds, 4), "tokens": codes[i].tolist()}
          if a.warnings:
            row["warning"] = "; ".join(a.warnings)
          yield row
      entries, total = [], 0.0

    for path in files:
      try:
        a = audio_lib.read(path, mix_channels=mix_channels, max_seconds=max_seconds)
      except audio_lib.AudioError as e:
        entries.append((path, str(e)))
        continue
      entries.append((path, a))
      total += a.seconds
      if total >= group_seconds:
        yield from flush()
    yield from flush()

  def _encode_robust(self, audios: Sequence[audio_lib.Audio]) -> list[np.ndarray | str]:
    """encode(), retried one input at a time if a group fails (one bad input, not all)."""
    try:
      return list(self.encode([a.samples for a in audios]))
    except (ValueError, RuntimeError, MemoryError) as e:
      if len(audios) == 1:
        return [f"encoding failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"]
      return [r for a in audios for r in self._encode_robust([a])]


def nnx_graphdef(cfg: SpeechTokenizerConfig, units: int):
  from flax import nnx
  abstract = nnx.eval_shape(lambda: program_lib.make_model(cfg, units))
  return program_lib.split_graphdef(abstract)
