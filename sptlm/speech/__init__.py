"""The 12.5 Hz supervised speech tokenizer: espeak-ng corpus, Whisper-style VQ encoder with a
CTC head, its trainer, and the `SpeechTokenizer` API (tokens from audio, text from tokens).

  corpus.py    build-corpus and the corpora users bring (manifests, TFDS)
  engines.py   TTS engines for build-corpus (espeak-ng, MBROLA, Flite, Festival, Piper)
  augment.py   training-audio augmentation                  robust_eval.py  `tokenizer evaluate`
  audio.py     WAV reading, resampling to 16 kHz, checks       features.py  log-mel (Whisper v3)
  model.py     encoder, VQ bottleneck, CTC head                 vq.py        EMA codebook, restarts
  units.py     ASR units (SentencePiece) and CTC decoding       wer.py       word error rate
  input.py     bucketed grain batches                           program.py   state, loss, step
  train.py     `sptlm tokenizer train`                          tokenizer.py the API
  cli.py       `sptlm tokenizer ...`                            config.py    config dataclasses
  whisper_vq/  released WhisperVQ tokenizers (GLM-4-Voice's): `sptlm tokenizer import`, encode only
"""
