"""Tiny text-to-token model: the spine's decoder LM on (characters, speech codes) pairs.

  sptlm tokenizer build-corpus --out runs/speech_corpus
  sptlm tokenizer train --config configs/speech_tokenizer_tiny.py --workdir runs/speech_tiny
  sptlm t2t train --config configs/t2t_tiny.py --workdir runs/t2t_tiny
  sptlm t2t synthesize --workdir runs/t2t_tiny --text "the cat sat on the mat"

The pairs are the corpus's training utterances encoded by the tokenizer (made once, into
WORKDIR/pairs); the held-out `test` sentences are for the round trip (benchmarks/t2t.py).
700 steps take about 26 min on 2 CPU cores: round-trip WER 22.6% (BENCHMARKS.md).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402


def get_config():
  c = _common.base(
      model=dict(num_layers=4, d_model=256, num_heads=4, num_kv_heads=4, head_dim=64,
                 d_ff=768, dtype="float32", remat="none"),
      data=dict(seq_len=512, global_batch_size=8),
      steps=700,
  )
  c.name = "t2t_tiny"
  c.kind = "t2t"
  c.vocab = dict(text_size=28, speech_size=1024, text_tokenizer="")
  c.data = dict(tokenizer="runs/speech_tiny", corpus="runs/speech_corpus", pairs=(),
                train_split="train", eval_split="test", seq_len=512, global_batch_size=8,
                max_text_units=200, max_speech_tokens=300, text_units="characters")
  c.synth = dict(batch_size=16, temperature=0.0, top_p=1.0, max_tokens_per_unit=1.5,
                 max_extra_tokens=16, prompt_bucket=32, max_text_units=200,
                 batching="static")
  c.model.tie_embeddings = True
  c.train.learning_rate = 2e-3
  c.train.min_learning_rate = 2e-4
  c.train.warmup_steps = 70
  c.train.weight_decay = 0.01
  c.train.log_every = 25
  c.train.checkpoint_every = 350
  c.mesh.data = -1
  c.mesh.fsdp = 1
  return c
