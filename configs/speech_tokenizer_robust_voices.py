"""speech_tokenizer_robust.py with half of the training clips said in a new voice first: Praat's
Change gender (formants x 0.85-1.2, a pitch median of 80-260 Hz, intonation x 0.5-1.8, tempo
x 0.85-1.15; sptlm.speech.voice_change), for the breadth of voices four engines lack
(BENCHMARKS.md, "Speech tokenizer across TTS engines", run 6). Measured (run 8): held-out Piper
unchanged (CER 44.5% vs 45.0%), the training engines 1.5-4 WER points worse at 4,400 steps;
kept as the recipe to try on larger budgets. Needs praat-parselmouth (the tts extra;
scripts/setup.sh installs it).

  sptlm tokenizer train --config configs/speech_tokenizer_robust_voices.py \
      --workdir runs/speech_robust_voices \
      "--config.asr.lm_text=('runs/lm_text/shakespeare','runs/lm_text/wordnet')"
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import speech_tokenizer_robust  # noqa: E402


def get_config():
  c = speech_tokenizer_robust.get_config()
  c.name = "speech_tokenizer_robust_voices"
  c.data.augment = dict(enabled=True, voice_prob=0.5)
  return c
