"""The tiny speech tokenizer trained to hold across voices it never heard (issue 16): the
same model as speech_tokenizer_tiny.py, on a corpus said by four TTS engines (espeak-ng,
MBROLA, Flite, Festival; Piper's neural voice held out for the test) from Shakespeare and
modern English (Debian's fortunes), with augmentation (speed, noise, reverb, telephone, gain,
clipping) on the training audio. See BENCHMARKS.md for what it reaches in how long, and
speech_tokenizer_robust_features.py for the same with augmented features too.

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
  c.data.augment = dict(enabled=True)
  return c
