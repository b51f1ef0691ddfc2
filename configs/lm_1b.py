"""~1B speech-text LM (16 layers, d 2048, GQA 16/8) with the 16,384-token speech vocabulary.

  python -m data_pipelines.train_sentencepiece --corpus CORPUS.txt --vocab-size 32000 \
      --out runs/sp32k     # the 32,000-piece text tokenizer, trained on your corpus
  sptlm train --config configs/lm_1b.py --workdir gs://BUCKET/runs/lm_1b \
      --config.data.corpus=CORPUS.txt
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402


def get_config():
  c = _common.base(
      model=dict(num_layers=16, d_model=2048, num_heads=16, num_kv_heads=8, head_dim=128,
                 d_ff=5632, rope_theta=500_000.0),
      data=dict(seq_len=8192, global_batch_size=256, packing_bins=256, num_shards=64),
      steps=50_000,
  )
  c.name = "lm_1b"
  c.train.learning_rate = 3e-4
  c.train.min_learning_rate = 3e-5
  c.vocab.text_tokenizer = "runs/sp32k.model"  # 32,000 ids = vocab.text_size (checked)
  return c
