"""speech_tokenizer_small.py (d=256, 3 + 3 layers) on Moonshine tiny's frozen encoder, with
the moonshine recipe's settings (speech_tokenizer_robust_moonshine.py: model.num_mels=288,
augmentation off, so the features come from the cache after the first epoch). The tiny
model's layers above the encoder under-fit (BENCHMARKS.md); this one has its own budget: 5,400
steps took 113.5 min on 2 CPU cores (about 30 of them beside a test run), for the held-out Piper
voice at 35.8% WER / 16.5% CER and the training engines at 29-44% / 14-23%, 1-3 points better
than the tiny model at 7,000 steps (84 min). The best recipe for voices it never heard (run 23
in BENCHMARKS.md): a corpus with Kokoro and 22,000 sentences (`build-corpus --fortunes --engines
espeak,mbrola,flite,festival,piper,kokoro --heldout-engine piper --train 22000`) and
`--config.train.steps=9000 --config.train.schedule_steps=9000`, 106 min from the feature cache:
held-out Piper 29.1% / 13.6%, the training engines 25-43% / 12-22%.

  sptlm tokenizer train --config configs/speech_tokenizer_small_moonshine.py \\
      --workdir runs/speech_small_moonshine \\
      "--config.asr.lm_text=('runs/lm_text/shakespeare','runs/lm_text/wordnet')"
  sptlm tokenizer evaluate --workdir runs/speech_small_moonshine \\
      --corpus runs/speech_corpus_engines
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import speech_tokenizer_robust_moonshine  # noqa: E402
import speech_tokenizer_small  # noqa: E402


def get_config():
  c = speech_tokenizer_small.get_config()
  moon = speech_tokenizer_robust_moonshine.get_config()
  c.name = "speech_tokenizer_small_moonshine"
  c.model.frontend = moon.model.frontend
  c.model.num_mels = moon.model.num_mels
  c.data.augment.enabled = moon.data.augment.enabled
  c.train.steps = 5400
  return c
