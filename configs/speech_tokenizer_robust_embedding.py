"""speech_tokenizer_robust.py with Google's speech_embedding as a frozen front end
(model.frontend='speech_embedding'; sptlm.speech.speech_embedding): a CNN pre-trained on real
speech turns 32-bin log-mel into 96-d features at 12.5 Hz; a layer norm and one linear map per
50 Hz phase replace Whisper's conv stem, and the layers, quantizer and CTC head are the tiny
model's. Needs openwakeword==0.4.0 and onnx (the speech-embedding extra), whose wheel carries
the weights. Measured (BENCHMARKS.md, runs 10-11): held-out engines at 1.0-1.4x the training
engines' CER (2.2-2.6x with Whisper's mel) but every engine at 29-55% CER; with
--config.model.frontend=speech_embedding_pool4 (the finer layer) the better of the two.

  sptlm tokenizer train --config configs/speech_tokenizer_robust_embedding.py \\
      --workdir runs/speech_robust_embedding \\
      "--config.asr.lm_text=('runs/lm_text/shakespeare','runs/lm_text/wordnet')"
  sptlm tokenizer evaluate --workdir runs/speech_robust_embedding \\
      --corpus runs/speech_corpus_engines
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import speech_tokenizer_robust  # noqa: E402


def get_config():
  c = speech_tokenizer_robust.get_config()
  c.name = "speech_tokenizer_robust_embedding"
  c.model.frontend = "speech_embedding"
  c.model.num_mels = 32
  c.model.mel_norm_seconds = 0.0
  return c
