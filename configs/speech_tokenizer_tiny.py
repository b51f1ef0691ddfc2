"""Tiny 12.5 Hz supervised speech tokenizer for 2 CPU cores (see BENCHMARKS.md for what it
reaches in how long).

  sptlm tokenizer build-corpus --out runs/speech_corpus
  sptlm tokenizer fetch-lm-text --out runs/lm_text/shakespeare
  sptlm tokenizer train --config configs/speech_tokenizer_tiny.py --workdir runs/speech_tiny \
      "--config.asr.lm_text=('runs/lm_text/shakespeare',)"

A Whisper-layout encoder (d=192) with a 1,024-code EMA codebook at 12.5 Hz between its two
halves: 2 layers at 50 Hz below the VQ, each looking 1 s either way, and 2 at the token rate
above it (a quarter of the cost of 50 Hz layers; a per-phase projection then makes 4 CTC frames
a token). Every layer has a Conformer convolution module (kernel 15: about twice as fast to
learn per step on 2 cores as plain Whisper layers). CTC over 32 SentencePiece units (letters
and a few frequent pieces) at 50 Hz, plus an intermediate CTC head on the 50 Hz frames below
the VQ; transcription is beam search with a word 3-gram LM. The full-scale recipe is
whisper-large-v3 split 16 + 16 with a 16,384-code codebook; the keys are the same.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402


def get_config():
  lm = _common.base(model={}, data={}, steps=4400)  # the LM recipe's train and mesh sections
  c = lm.__class__()
  c.kind = "speech_tokenizer"
  c.name = "speech_tokenizer_tiny"
  c.model = dict(num_mels=128, d_model=192, num_heads=4, d_ff=768, layers_before_vq=2,
                 layers_after_vq=2, pool=4, block_causal_seconds=0.0, causal_stem=False,
                 max_seconds=30.0, ctc_upsample=4, dtype="float32", param_dtype="float32",
                 init_std=0.02, attention_window_seconds=1.0,
                 conv_kernel=15, token_rate_layers=2, positions="rope")
  c.vq = dict(codebook_size=1024, ema_decay=0.99, commitment_weight=0.25, restart_after=20,
              warmup_steps=200, code_dim=0, normalize=False)
  c.asr = dict(unit_type="unigram", units=32, text_tokenizer="", inter_ctc_weight=0.5,
               lm_order=3, lm_text=(), beam=64, lm_alpha=0.7, lm_beta=1.0)
  c.data = dict(corpus="runs/speech_corpus", train_split="train", eval_splits=("dev",),
                batch_seconds=32.0, short_first=True,
                # 88% of the padded audio is speech (77% with 4 buckets), for 3 more compiles
                bucket_seconds=(1.6, 2.24, 2.88, 3.52, 4.16, 5.12, 7.68),
                eval_every=1500, eval_utterances=100, cache_dir="", tune_split="dev")
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
