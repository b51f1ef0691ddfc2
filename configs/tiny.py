"""Tiny CPU experiment: the embedded default; trains in about two minutes on a laptop.

Speech-text pre-training on the paper's mixture (text, interleaved text + speech spans,
speech-only, ASR, TTS; configs/data_tiny.py) from the shipped shards; set data.shards="" to
train on the text corpus alone.

  sptlm train --config configs/tiny.py --workdir runs/tiny
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402


def get_config():
  c = _common.base(
      model=dict(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32,
                 d_ff=384, dtype="float32", remat="none"),
      data=dict(seq_len=128, global_batch_size=16, packing_bins=32, num_shards=2,
                shards="data_pipelines/assets/tiny_mixture"),
      steps=300,
  )
  c.name = "tiny"
  c.vocab.text_size = 1024
  c.vocab.speech_size = 1024  # the tiny speech tokenizer's codebook
  c.model.tie_embeddings = True
  c.train.learning_rate = 3e-3
  c.train.min_learning_rate = 3e-4
  c.train.warmup_steps = 20
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.mesh.data = -1
  c.mesh.fsdp = 1
  return c
