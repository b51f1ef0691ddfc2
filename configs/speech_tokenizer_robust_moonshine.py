"""speech_tokenizer_robust.py on the frozen encoder of Moonshine tiny, an ASR model trained on
real speech (model.frontend='moonshine_tiny'; sptlm.speech.moonshine): its 288-d output, taken
to 50 Hz, goes through a layer norm and a linear map into the tiny model's layers, quantizer
and CTC head, which alone are trained. Needs moonshine-voice==0.0.73 (whose wheel carries the
weights) and onnxruntime: the moonshine extra. Measured (BENCHMARKS.md, runs 12-13):
the held-out Piper voice at 38-39% WER / 18-19% CER, inside the training engines' range (run 5,
Whisper's mel: 74.5% / 45.0%). Augmentation is off: with this front end it was 1-3 points
worse on clean speech (--config.data.augment.enabled=True turns it back on).

  sptlm tokenizer train --config configs/speech_tokenizer_robust_moonshine.py \\
      --workdir runs/speech_robust_moonshine \\
      "--config.asr.lm_text=('runs/lm_text/shakespeare','runs/lm_text/wordnet')"
  sptlm tokenizer evaluate --workdir runs/speech_robust_moonshine \\
      --corpus runs/speech_corpus_engines
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import speech_tokenizer_robust  # noqa: E402


def get_config():
  c = speech_tokenizer_robust.get_config()
  c.name = "speech_tokenizer_robust_moonshine"
  c.model.frontend = "moonshine_tiny"
  c.model.num_mels = 288
  c.data.augment.enabled = False  # 1-3 CER points better on clean speech (BENCHMARKS.md, run 13)
  return c
