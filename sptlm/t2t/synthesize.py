"""Text -> 12.5 Hz speech tokens with a trained t2t model: `T2T.load(workdir).synthesize(texts)`.

Decoding is the spine's KV-cached `generate`: one jitted loop per batch, no Python per token.
Texts are cut into pieces of at most synth.max_text_units units (at sentence ends, else at
spaces), sorted by length and decoded synth.batch_size at a time; a batch's prompt width is
rounded up to synth.prompt_bucket and padded rows fill the last batch, so the program compiles
once per width bucket, never per batch. Each piece samples from its own stream (the seed
folded with a hash of its text), so the output of a text does not depend on the batch size or
on the order or company of the inputs. A piece stops at <|end_of_audio|> or at
max_tokens_per_unit x its characters + max_extra_tokens (characters whatever the units, so the
limit means the same for every choice of units). With synth.batching = "continuous" the
pieces go through sptlm.model.continuous instead: a piece that stops frees its row for the next
(the same tokens; BENCHMARKS.md measures which is faster).
"""

import collections
import dataclasses
import json
import logging
import math
import re
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from data_pipelines.vocabulary import Vocabulary
from sptlm.errors import InputError, MissingFileError
from sptlm.model import continuous, decode, transformer
from sptlm.speech.corpus import normalize_text
from sptlm.t2t import config as config_lib
from sptlm.t2t import pairs as pairs_lib
from sptlm.t2t import units as units_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Summary:
  """What a synthesize call met: each kind of bad input is counted, never silently empty."""

  texts: int = 0
  pieces: int = 0
  tokens: int = 0
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def line(self) -> str:
    extra = ", ".join(f"{n} {why}" for why, n in sorted(self.counts.items()) if n)
    return (f"{self.texts:,} texts -> {self.tokens:,} speech tokens in {self.pieces:,} pieces"
            + (f" ({extra})" if extra else ""))


def split_text(text: str, max_units: int) -> list[str]:
  """Pieces of at most `max_units` normalized characters: at sentence ends, else at spaces."""
  pieces: list[str] = []
  for sentence in re.split(r"(?<=[.!?;:])\s+", text.strip()):
    words = normalize_text(sentence).split()
    current = ""
    for w in words:
      w = w[:max_units]
      if current and len(current) + 1 + len(w) > max_units:
        pieces.append(current)
        current = w
      else:
        current = f"{current} {w}" if current else w
    if current:
      pieces.append(current)
  return pieces


class T2T:
  """A trained text-to-token model, ready to synthesize."""

  def __init__(self, cfg: config_lib.T2TConfig, params: Any, tokenizer: dict[str, Any],
               mesh: jax.sharding.Mesh | None = None,
               units: units_lib.Units | None = None):
    self.cfg, self.tokenizer = cfg, tokenizer
    self.units = units or units_lib.Characters()
    self.vocab = Vocabulary(cfg.vocab.text_size, cfg.vocab.speech_size)
    abstract = nnx.eval_shape(lambda: transformer.build(cfg.model, self.vocab.size, 0))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    abstract_params.replace_by_pure_dict(params)
    self.model = nnx.merge(graphdef, abstract_params)
    self.mesh = mesh
    self.batch_sharding = None
    if mesh is not None:  # the batch over the data axes; parameters replicated
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      state = nnx.state(self.model)
      nnx.update(self.model, jax.device_put(state, replicated))
      self.batch_sharding = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    self.boa = self.vocab.special_id("<|begin_of_audio|>")
    self.eoa = self.vocab.special_id("<|end_of_audio|>")
    self.summary = Summary()

  @classmethod
  def load(cls, workdir: str, *, tokenizer: Any = None,
           mesh: jax.sharding.Mesh | None = None) -> "T2T":
    """The newest checkpoint of a `sptlm t2t train` work directory. `tokenizer` (a
    SpeechTokenizer, or its work directory) must be the one that made the training codes."""
    from sptlm.train import checkpoint as checkpoint_lib
    from sptlm.train import program as program_lib
    wd = epath.Path(workdir)
    if not (wd / "config.json").exists():
      raise MissingFileError(f"{wd} is not a t2t work directory (no config.json); train one "
                             "with `sptlm t2t train`")
    cfg = config_lib.from_json((wd / "config.json").read_text())
    ident = json.loads((wd / pairs_lib.TOKENIZER_FILE).read_text())
    if tokenizer is not None:
      check_pairing(ident, tokenizer, str(wd))
    step, state = checkpoint_lib.load_newest(
        str(wd), lambda mesh: program_lib.build(cfg, mesh).abstract_state)
    log.info("loaded t2t model %s at step %d", wd, step)
    return cls(cfg, jax.device_get(state["params"]), ident, mesh,
               units_lib.load(cfg.data.text_units, str(wd)))

  def max_tokens(self, chars: int) -> int:
    """The most speech tokens a piece of `chars` normalized characters may get."""
    s = self.cfg.synth
    return math.ceil(s.max_tokens_per_unit * chars) + s.max_extra_tokens

  def synthesize(self, texts: Sequence[str], *, seed: int = 0, temperature: float | None = None,
                 top_p: float | None = None, batch_size: int | None = None,
                 batching: str | None = None) -> list[np.ndarray]:
    """Raw codebook indices (0..K-1) per text; an empty array for a text with nothing to say
    (counted in self.summary, which `sptlm t2t synthesize` prints). `batching` overrides
    synth.batching ("static" or "continuous"; batch_size is then the number of slots)."""
    s = self.cfg.synth
    batching = batching or s.batching
    if batching not in ("static", "continuous"):
      raise InputError(f"batching={batching!r}: use 'static' or 'continuous'")
    temperature = s.temperature if temperature is None else temperature
    top_p = s.top_p if top_p is None else top_p
    batch = batch_size or s.batch_size
    summary = Summary(texts=len(texts))
    pieces: list[tuple[int, str]] = []  # (text index, normalized piece)
    for i, text in enumerate(texts):
      if not text or not text.strip():
        summary.counts["empty texts"] += 1
        continue
      enc = self.units.encode(text)
      if enc.dropped:
        summary.counts["characters without a unit (dropped)"] += enc.dropped
      if not enc.ids:
        summary.counts["texts without a speakable character"] += 1
        continue
      parts = split_text(text, s.max_text_units) if len(enc.text) > s.max_text_units else [
          enc.text]
      if len(parts) > 1:
        summary.counts["long texts split"] += 1
      pieces.extend((i, p) for p in parts)
    summary.pieces = len(pieces)
    out_pieces: dict[int, list[np.ndarray]] = collections.defaultdict(list)
    order = sorted(range(len(pieces)), key=lambda j: (len(pieces[j][1]), j))
    results: dict[int, np.ndarray] = {}
    if batching == "continuous" and order:
      rows = continuous.generate(
          self.model, [self._prompt(pieces[j][1]) for j in order], slots=batch,
          max_new_tokens=[self._limit(pieces[j][1]) for j in order],
          rng=jax.random.PRNGKey(seed), temperature=temperature, top_p=top_p,
          stop_tokens=[self.eoa], pad_id=self.eoa,
          row_seeds=[zlib.crc32(pieces[j][1].encode()) for j in order],
          prompt_bucket=s.prompt_bucket, batch_sharding=self.batch_sharding)
      results = {j: self._speech(row, summary) for j, row in zip(order, rows)}
      order = []
    for start in range(0, len(order), batch):
      chunk = order[start:start + batch]
      for j, codes in zip(chunk, self._decode([pieces[j][1] for j in chunk], batch, seed,
                                              temperature, top_p, summary)):
        results[j] = codes
    for j, (i, _) in enumerate(pieces):
      out_pieces[i].append(results[j])
    out = [np.concatenate(out_pieces[i]).astype(np.int32) if out_pieces[i]
           else np.zeros((0,), np.int32) for i in range(len(texts))]
    summary.tokens = int(sum(len(o) for o in out))
    self.summary = summary
    return out

  def _decode(self, pieces: list[str], batch: int, seed: int, temperature: float,
              top_p: float, summary: Summary) -> list[np.ndarray]:
    """One generate call for up to `batch` pieces (padded with one-token rows)."""
    s = self.cfg.synth
    ids = [self._prompt(p) for p in pieces]
    width = -(-max(len(x) for x in ids) // s.prompt_bucket) * s.prompt_bucket
    chars = -(-max(len(p) for p in pieces) // s.prompt_bucket) * s.prompt_bucket  # a bucket too
    prompts = np.zeros((batch, width), np.int32)
    lengths = np.ones((batch,), np.int32)
    prompts[:, 0] = self.boa
    limits = np.ones((batch,), np.int32)
    seeds = np.zeros((batch,), np.uint32)
    for r, (p, x) in enumerate(zip(pieces, ids)):
      prompts[r, :len(x)] = x
      lengths[r] = len(x)
      limits[r] = self._limit(p)
      seeds[r] = zlib.crc32(p.encode())
    out = decode.generate(
        self.model, prompts, lengths=lengths, max_new_tokens=self._limit("x" * chars),
        rng=jax.random.PRNGKey(seed), temperature=temperature, top_p=top_p,
        stop_tokens=[self.eoa], pad_id=self.eoa, row_seeds=seeds, row_max_new_tokens=limits,
        batch_sharding=self.batch_sharding)
    tokens = np.asarray(jax.device_get(out.tokens))
    n = np.asarray(jax.device_get(out.lengths))
    return [self._speech(tokens[r, :n[r]], summary) for r in range(len(pieces))]

  def _prompt(self, piece: str) -> list[int]:
    return self.units.encode(piece).ids + [self.boa]

  def _limit(self, piece: str) -> int:
    return self.max_tokens(len(piece)) + 1  # + <|end_of_audio|>; piece is normalized text

  def _speech(self, row: np.ndarray, summary: Summary) -> np.ndarray:
    """A generated row -> codebook indices: the end-of-speech cut off, anything else counted."""
    if row.size and row[-1] == self.eoa:
      row = row[:-1]
    else:
      summary.counts["pieces cut at the length limit"] += 1
    speech = self.vocab.is_speech(row)
    if not speech.all():
      summary.counts["non-speech tokens dropped"] += int((~speech).sum())
    return self.vocab.speech_code(row[speech])


def check_pairing(ident: dict[str, Any], tokenizer: Any, where: str) -> None:
  """Refuses a speech tokenizer other than the one whose codes the t2t model learned."""
  if isinstance(tokenizer, (str, epath.Path)):
    from sptlm.speech.tokenizer import SpeechTokenizer
    tokenizer = SpeechTokenizer.load(str(tokenizer), lm=None)
  got = pairs_lib.fingerprint(tokenizer)
  if ident.get("fingerprint") and got != ident["fingerprint"]:
    raise InputError(f"the t2t model {where} learned the codes of the speech tokenizer "
                     f"{ident['path']} (codebook {ident['fingerprint']}), not this one "
                     f"(codebook {got}): its tokens would mean other sounds")
  if int(ident.get("codebook_size", tokenizer.codebook_size)) != tokenizer.codebook_size:
    raise InputError(f"the t2t model {where} has {ident['codebook_size']} speech codes, the "
                     f"speech tokenizer {tokenizer.codebook_size}")
