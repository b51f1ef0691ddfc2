"""Text-to-token: the spine's decoder LM trained on TTS pairs to turn text into 12.5 Hz speech
tokens, so a text corpus becomes interleaved speech-text data without rendering audio.

  config      `get_config()` files of kind "t2t" -> frozen dataclasses
  units       the text side: characters of the normalized transcript
  pairs       (transcript, speech codes) pairs: made by a speech tokenizer, or read from JSONL
  input       packed training rows [text, <|begin_of_audio|>, speech, <|end_of_audio|>]
  train       `sptlm t2t train`, on the shared training loop
  synthesize  T2T.load(workdir).synthesize(texts): batched, KV-cached, length-bucketed decoding
"""
