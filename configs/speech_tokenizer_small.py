"""A wider, deeper speech tokenizer for the robust corpus (issue 16), with its own budget:
speech_tokenizer_robust.py (four TTS engines, Piper held out, audio augmentation) with d=256
and 3 + 3 layers instead of d=192 and 2 + 2, for when the tiny model's capacity is what
limits it. About twice the cost per step on 2 CPU cores: 6,600 steps took 90.6 min, for
clean WER 29-39% (CER 14-19%) in the training engines and 73.7% (CER 45.0%) on held-out Piper,
0.5-3.5 points better than the tiny model in about as long (BENCHMARKS.md, "Speech tokenizer
across TTS engines", run 4).

  sptlm tokenizer train --config configs/speech_tokenizer_small.py --workdir runs/speech_small \
      "--config.asr.lm_text=('runs/lm_text/shakespeare','runs/lm_text/wordnet')"
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import speech_tokenizer_robust  # noqa: E402


def get_config():
  c = speech_tokenizer_robust.get_config()
  c.name = "speech_tokenizer_small"
  c.model.update(d_model=256, num_heads=4, d_ff=1024, layers_before_vq=3, layers_after_vq=3,
                 token_rate_layers=3)
  c.train.learning_rate = 2.5e-3  # a little under the tiny model's 3e-3 for the wider layers
  c.train.steps = 6600  # about the wall-clock of the tiny model's 8,800 steps
  return c
