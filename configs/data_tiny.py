"""Tiny interleaved speech-text data: the shipped Shakespeare as text and as interleaved text
with 12.5 Hz speech spans (the paper's lambda = 10, eta = 0.3), the tiny tokenizers.

  sptlm t2t train --config configs/t2t_tiny.py --workdir runs/t2t_tiny   # the t2t model
  sptlm data inspect --config configs/data_tiny.py --n 3
"""

import ml_collections

CORPUS = "data_pipelines/assets/tinyshakespeare.txt"


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "data_tiny"
  c.kind = "data"
  c.vocab = dict(text_tokenizer="data_pipelines/assets/tiny_sp1024.model", text_size=1024,
                 speech_size=1024)
  c.interleave = dict(lam=10.0, eta=0.3, seed=0, t2t="runs/t2t_tiny", batch=32)
  c.tasks = {
      "text": dict(kind="text", files=(CORPUS,), rate=0.3),
      "interleaved": dict(kind="interleaved", files=(CORPUS,), rate=0.7),
  }
  return c
