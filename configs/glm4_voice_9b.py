"""Continued pre-training of GLM-4-Voice-9B: the paper's 9B recipe (sequence 8,192, lr 6e-5..6e-6).

GLM-4-Voice-9B is GLM-4-9B's network (configs/glm4_9b.py) whose vocabulary already holds the
speech tokens: its 168,960 rows are GLM-4's text ids and special tokens, then <|audio_0|> ..
<|audio_16383|> at ids 152,353 .. 168,736 (after its specials, not straight after the text
vocabulary), then padding. The run adopts those ids (vocab.speech_offset, vocab.special_ids:
its own <|begin_of_audio|>, <|end_of_audio|>, <|system|>, <|user|>, <|assistant|>); the three
specials it lacks (<|begin_of_text|>, <|end_of_text|>, <|pad|>) take its first unused padding
rows (vocab.special_offset), so the model keeps its 168,960 rows. The speech tokenizer is
GLM-4-Voice's own (16,384 codes; `sptlm tokenizer import`).

The user downloads the model folder (config.json in ChatGLM's keys, four bf16 safetensors
shards with model.safetensors.index.json, its tokenizer files); from-hf reads the network from
config.json and the ids from the tokenizer files (printing any that differ from this file):

  huggingface-cli download THUDM/glm-4-voice-9b --local-dir checkpoints/glm-4-voice-9b
  sptlm convert from-hf --hf checkpoints/glm-4-voice-9b --config configs/glm4_voice_9b.py \
      --out gs://BUCKET/init_voice_9b
  sptlm train --config gs://BUCKET/init_voice_9b/config.py ...   # a local copy of it, see README
  sptlm compile --config configs/glm4_voice_9b.py --topology v5p-128

vocab.text_tokenizer must be a folder with a tokenizer.json of GLM-4-Voice's tokenizer (its
168,737 ids, the speech tokens included); the download ships it as tiktoken's tokenizer.model
plus custom code, which sptlm does not run.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import glm4_9b  # noqa: E402

# GLM-4-Voice-9B's tokenizer: GLM-4's specials (151,329 ..) and its speech tokens.
SPEECH_OFFSET = 152_353  # <|audio_0|>
SPECIAL_IDS = {"<|begin_of_audio|>": 151_343, "<|end_of_audio|>": 151_344,
               "<|system|>": 151_335, "<|user|>": 151_336, "<|assistant|>": 151_337}
FIRST_UNUSED = 168_737  # <|audio_16383|> + 1: the first padding row


def get_config():
  c = glm4_9b.get_config()  # the same network, sequence length, batch and optimizer recipe
  c.name = "glm4_voice_9b"
  c.model.norm_eps = 3.90625e-08
  c.vocab.text_size = 168_960  # all of the model's rows: text, specials, speech, padding
  c.vocab.speech_size = 16_384
  c.vocab.speech_offset = SPEECH_OFFSET
  c.vocab.special_offset = FIRST_UNUSED
  c.vocab.special_ids = dict(SPECIAL_IDS)
  c.vocab.text_tokenizer = "checkpoints/glm-4-voice-9b"  # a folder with its tokenizer.json
  return c
