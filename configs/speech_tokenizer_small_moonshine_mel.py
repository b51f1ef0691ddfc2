"""speech_tokenizer_small_moonshine.py with model.frontend='moonshine_tiny_mel': Moonshine tiny's
frozen features and Whisper's log-mel side by side (288 + 128), each through its own stem,
summed. Moonshine alone loses 5-6 CER points on espeak-ng and MBROLA against the mel (README);
the log-mel path is there to win them back while Moonshine's keeps the unseen voices. Its
features come from the same cache as a moonshine_tiny run (only Moonshine's part is kept).

  sptlm tokenizer train --config configs/speech_tokenizer_small_moonshine_mel.py \\
      --workdir runs/speech_small_moonshine_mel \\
      "--config.asr.lm_text=('runs/lm_text/shakespeare','runs/lm_text/wordnet')"

The best all-round run so far (run 26 in BENCHMARKS.md, 92 min on 2 CPU cores from the feature
cache): on the corpus with Kokoro (see speech_tokenizer_small_moonshine.py) add
`--config.model.mel_norm_seconds=3.0 --config.model.mel_stem_dropout=0.25
--config.train.steps=9000 --config.train.schedule_steps=9000`: training engines 24-38% WER,
held-out Piper 31.0% / 14.5% CER.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import speech_tokenizer_small_moonshine  # noqa: E402


def get_config():
  c = speech_tokenizer_small_moonshine.get_config()
  c.name = "speech_tokenizer_small_moonshine_mel"
  c.model.frontend = "moonshine_tiny_mel"
  c.model.num_mels = 288 + 128
  return c
