"""The paper's pre-training mixture (data_pipelines/mixture.py, PAPER_MIXTURE) for the 9B model:
GLM-4's tokenizer plus 16,384 speech tokens; rates are token shares (text 30%, speech-only
3.1%, ASR 0.725%, TTS 0.725%, interleaved the rest). Point the files at your data:
  corpus/*.jsonl     pre-training text ({"text"} per line), also the interleaved source
  speech/*.jsonl     speech tokens of unlabelled audio (`sptlm tokenizer encode` output)
  pairs/*.jsonl      transcribed audio as {"text", "tokens"} (ASR and TTS)

  sptlm data materialize --config configs/data_glm4_9b.py --output gs://BUCKET/mixture_9b \
      --runner=DataflowRunner --project=P --region=R --temp_location=gs://BUCKET/tmp
  sptlm train --config configs/glm4_9b.py --config.data.shards=gs://BUCKET/mixture_9b ...
"""

import ml_collections

from data_pipelines.mixture import PAPER_MIXTURE


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "data_glm4_9b"
  c.kind = "data"
  c.vocab = dict(text_tokenizer="checkpoints/glm-4-9b", text_size=151_552, speech_size=16_384)
  c.interleave = dict(lam=10.0, eta=0.3, seed=0, t2t="runs/t2t_glm4", batch=256)
  c.tasks = {
      "text": dict(kind="text", files=("corpus/text-00000.jsonl",),
                   rate=PAPER_MIXTURE["text"], shards=1024),
      "interleaved": dict(kind="interleaved", files=("corpus/interleave-00000.jsonl",),
                          rate=PAPER_MIXTURE["interleaved"], shards=4096),
      "speech": dict(kind="speech", files=("speech/tokens-00000.jsonl",),
                     rate=PAPER_MIXTURE["speech"], shards=256),
      "asr": dict(kind="asr", files=("pairs/pairs-00000.jsonl",),
                  rate=PAPER_MIXTURE["asr"], shards=64),
      "tts": dict(kind="tts", files=("pairs/pairs-00000.jsonl",),
                  rate=PAPER_MIXTURE["tts"], shards=64),
  }
  return c
