"""GLM-4-9B-shaped speech-text LM: the paper's 9B recipe (sequence 8,192, lr 6e-5 -> 6e-6).

Text vocabulary 151,552 (GLM-4's, padded) plus 16,384 speech tokens, continued from a text LM.
vocab.text_tokenizer is GLM-4's own tokenizer: a local copy of the model folder (its
tokenizer.json; nothing is downloaded at run time); data.corpus is your pre-training text.

  huggingface-cli download THUDM/glm-4-9b --local-dir checkpoints/glm-4-9b   # once, anywhere
  sptlm convert from-hf --hf checkpoints/glm-4-9b --config configs/glm4_9b.py --out gs://BUCKET/init_9b
  sptlm train --config configs/glm4_9b.py --workdir gs://BUCKET/runs/glm4_9b \
      --config.train.init_from=gs://BUCKET/init_9b \
      --config.vocab.text_tokenizer=checkpoints/glm-4-9b --config.data.corpus=CORPUS.txt
  sptlm compile --config configs/glm4_9b.py --topology v5p-128
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402


def get_config():
  c = _common.base(
      model=dict(num_layers=40, d_model=4096, num_heads=32, num_kv_heads=2, head_dim=128,
                 d_ff=13_696, rope_fraction=0.5, rope_style="interleaved", qkv_bias=True,
                 norm_eps=1.5625e-7, attention_chunk=1024, loss_chunk=1024),
      data=dict(seq_len=8192, global_batch_size=64, packing_bins=256, num_shards=64),
      steps=120_000,
  )
  c.name = "glm4_9b"
  c.vocab.text_size = 151_552
  c.vocab.text_tokenizer = "checkpoints/glm-4-9b"  # GLM-4's tokenizer folder (151,329 ids)
  c.data.corpus = "corpus/pretrain.txt"  # not the shipped Shakespeare: point it at yours
  c.mesh.rules.kv_heads = None  # 2 kv heads: replicate rather than split across tensor
  return c
