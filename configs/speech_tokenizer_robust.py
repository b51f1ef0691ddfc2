"""The tiny speech tokenizer trained to hold across voices it never heard (issue 16): the
same model as speech_tokenizer_tiny.py, on a corpus said by four TTS engines (espeak-ng,
MBROLA, Flite, Festival; Piper's neural voice held out for the test) from Shakespeare and
modern English (Debian's fortunes), with augmentation on the training audio (speed, noise,
reverb, telephone, gain, clipping) and on its features (VTLP warp, SpecAugment masks). See
BENCHMARKS.md for what it reaches in how long.

  sptlm tokenizer build-corpus --out runs/speech_corpus_engines --fortunes \
      --engines espeak,mbrola,flite,festival,piper --heldout-engine piper \
      --train 10000 --test 300 --dev 200
  sptlm tokenizer fetch-lm-text --out runs/lm_text/shakespeare
  sptlm tokenizer fetch-lm-text --source wordnet --out runs/lm_text/wordnet
  sptlm tokenizer train --config configs/speech_tokenizer_robust.py --workdir runs/speech_robust \
      "--config.asr.lm_text=('runs/lm_text/shakespeare','runs/lm_text/wordnet')"
  sptlm tokenizer evaluate --workdir runs/speech_robust --corpus runs/speech_corpus_engines
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import speech_tokenizer_tiny  # noqa: E402


def get_config():
  c = speech_tokenizer_tiny.get_config()
  c.name = "speech_tokenizer_robust"
  c.data.corpus = "runs/speech_corpus_engines"
  # the audio chain's defaults, then on the features: formants moved without the tempo (VTLP),
  # a random equalizer, and SpecAugment's masks, so no single band or instant carries a word
  c.data.augment = dict(enabled=True, warp_prob=0.6, warp_min=0.88, warp_max=1.12,
                        eq_prob=0.5, eq_db=6.0,
                        freq_masks=2, freq_mask_bins=15, time_masks=2, time_mask_frames=20,
                        time_mask_ratio=0.05)
  c.train.steps = 8800  # 10.7 passes over the 7.3 h corpus; see BENCHMARKS.md for the time
  return c
