"""~150M speech-text LM (12 layers, d 768) with the full 16,384-token speech vocabulary.

  python -m data_pipelines.train_sentencepiece --corpus CORPUS.txt --vocab-size 32000 \
      --out runs/sp32k     # the 32,000-piece text tokenizer, trained on your corpus
  sptlm train --config configs/lm_150m.py --workdir gs://BUCKET/runs/lm_150m \
      --config.data.corpus=CORPUS.txt
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402


def get_config():
  c = _common.base(
      model=dict(num_layers=12, d_model=768, num_heads=12, num_kv_heads=4, head_dim=64,
                 d_ff=2048),
      data=dict(seq_len=2048, global_batch_size=256, packing_bins=256, num_shards=16),
      steps=20_000,
  )
  c.name = "lm_150m"
  c.train.learning_rate = 6e-4
  c.train.min_learning_rate = 6e-5
  c.vocab.text_tokenizer = "runs/sp32k.model"  # 32,000 ids = vocab.text_size (checked)
  return c
