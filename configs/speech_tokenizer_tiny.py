"""Tiny 12.5 Hz supervised speech tokenizer for 2 CPU cores (see
BENCHMARKS.md for what it reaches in how long).

  sptlm tokenizer build-corpus --out runs/speech_corpus
  sptlm tokenizer train --config configs/speech_tokenizer_tiny.py --workdir runs/speech_tiny

A Whisper-layout encoder (d=192, 2 layers below the VQ, each looking 1 s either way, and 2
above; each layer with a Conformer convolution module, kernel 15, which learned about twice as
fast per step on 2 cores as plain Whisper layers), a 1,024-code EMA codebook at 12.5 Hz, a CTC head over 32 SentencePiece units (letters
and a few frequent pieces) at 50 Hz (each token repeated 4 times above the bottleneck) plus an
intermediate CTC head on the 50 Hz frames below it; transcription decodes with a word 3-gram
LM. The full-scale recipe is whisper-large-v3 split 16 + 16 with a 16,384-code codebook; the
keys are the same.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402


def get_config():
  lm = _common.base(model={}, data={}, steps=3000)  # the LM recipe's train and mesh sections
  c = lm.__class__()
  c.kind = "speech_tokenizer"
  c.name = "speech_tokenizer_tiny"
  c.model = dict(num_mels=128, d_model=192, num_heads=4, d_ff=768, layers_before_vq=2,
                 layers_after_vq=2, pool=4, block_causal_seconds=0.0, causal_stem=False,
                 max_seconds=30.0, ctc_upsample=4, dtype="float32", param_dtype="float32",
                 init_std=0.02, attention_window_seconds=1.0,
                 conv_kernel=15, token_rate_layers=0, positions="sinusoid")
  c.vq = dict(codebook_size=1024, ema_decay=0.99, commitment_weight=0.25, restart_after=20,
              warmup_steps=200, code_dim=0, normalize=False)
  c.asr = dict(unit_type="unigram", units=32, text_tokenizer="", inter_ctc_weight=0.5,
               lm_order=3, lm_text=(), beam=32, lm_alpha=0.7, lm_beta=1.0)
  c.data = dict(corpus="runs/speech_corpus", train_split="train", eval_splits=("dev",),
                batch_seconds=32.0, bucket_seconds=(2.56, 3.84, 5.12, 7.68), short_first=True,
                eval_every=1000, eval_utterances=100, cache_dir="", tune_split="dev")
  c.train = lm.train
  c.train.learning_rate = 3e-3
  c.train.min_learning_rate = 1e-4
  c.train.warmup_steps = 100
  c.train.schedule = "cosine"
  c.train.weight_decay = 0.01
  c.train.log_every = 20
  c.train.checkpoint_every = 500
  c.mesh = lm.mesh
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.rules.codebook = None
  return c
