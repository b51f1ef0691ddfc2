"""Tiny speech-text data in the paper's mixture: the shipped Shakespeare as text and as
interleaved text with 12.5 Hz speech spans (lambda = 10, eta = 0.3), plus real speech tokens
(espeak-ng audio through the tiny speech tokenizer) as speech-only, ASR and TTS examples.
Rates are the paper's token shares (data_pipelines/mixture.py, PAPER_MIXTURE).

Its materialized shards ship in data_pipelines/assets/tiny_mixture/ (the embedded default
trains on them); rebuilt from scratch by (see data_pipelines/assets/README.md):
  sptlm t2t train --config configs/t2t_tiny.py --workdir runs/t2t_tiny2   # the t2t model
  sptlm data materialize --config configs/data_tiny.py --output data_pipelines/assets/tiny_mixture
  sptlm data inspect --config configs/data_tiny.py --n 3
"""

import ml_collections

from data_pipelines.mixture import PAPER_MIXTURE

ASSETS = "data_pipelines/assets"
CORPUS = f"{ASSETS}/tinyshakespeare.txt"


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "data_tiny"
  c.kind = "data"
  c.vocab = dict(text_tokenizer=f"{ASSETS}/tiny_sp1024.model", text_size=1024,
                 speech_size=1024)
  c.interleave = dict(lam=10.0, eta=0.3, seed=0, t2t="runs/t2t_tiny2", batch=64)
  c.tasks = {
      "text": dict(kind="text", files=(CORPUS,), rate=PAPER_MIXTURE["text"], shards=2),
      "interleaved": dict(kind="interleaved", files=(CORPUS,),
                          rate=PAPER_MIXTURE["interleaved"], shards=4),
      "speech": dict(kind="speech", files=(f"{ASSETS}/tiny_speech_tokens.jsonl",),
                     rate=PAPER_MIXTURE["speech"], shards=2),
      "asr": dict(kind="asr", files=(f"{ASSETS}/tiny_speech_pairs.jsonl",),
                  rate=PAPER_MIXTURE["asr"], shards=2),
      "tts": dict(kind="tts", files=(f"{ASSETS}/tiny_speech_pairs.jsonl",),
                  rate=PAPER_MIXTURE["tts"], shards=2),
  }
  return c
