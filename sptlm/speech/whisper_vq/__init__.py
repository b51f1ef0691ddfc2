"""Released WhisperVQ speech tokenizers (GLM-4-Voice's layout) run by sptlm: encode only.

  config.py     config.json -> the architecture (every key sptlm cannot run named)
  features.py   Whisper's log-mel exactly as the reference, and its 30 s windows
  model.py      the encoder up to the quantizer (Flax NNX)
  weights.py    the released safetensors layout <-> sptlm parameters, with checks
  tokenizer.py  `WhisperVQTokenizer`: the `SpeechTokenizer` API, batched and sharded
  importer.py   `sptlm tokenizer import`: a checkpoint folder -> a tokenizer work directory
"""
