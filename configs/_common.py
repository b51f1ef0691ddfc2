"""Shared pieces of the experiment configs: the paper's recipe and the default axis rules."""

import ml_collections

# One rule per logical axis name; parameters and activations name only logical axes.
DEFAULT_RULES = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",  # parameter rows along d_model: FSDP shards them
    "act_embed": None,  # activations keep d_model whole
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
}


def base(model: dict, data: dict, *, steps: int) -> ml_collections.ConfigDict:
  """A complete config: the model and data given, the paper's optimizer recipe around them."""
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.model = dict(
      rope_theta=10_000.0, rope_fraction=1.0, rope_style="rotate_half", qkv_bias=False,
      tie_embeddings=False, norm_eps=1e-5, attention="reference", attention_chunk=0,
      loss_chunk=0,
      attention_block_q=512, attention_block_kv=512,
      scan_layers=True, remat="full", dtype="bfloat16", param_dtype="float32", init_std=0.02,
  )
  c.model.update(model)
  c.vocab = dict(text_size=32_000, speech_size=16_384,
                 text_tokenizer="data_pipelines/assets/tiny_sp1024.model")
  c.data = dict(corpus="data_pipelines/assets/tinyshakespeare.txt", packing_bins=0, num_shards=1)
  c.data.update(data)
  c.train = dict(
      steps=steps, seed=0,
      # The paper: AdamW (0.9, 0.95), learning rate decayed linearly 6e-5 -> 6e-6 (continued
      # pre-training from a text LM). From scratch, raise the peak.
      learning_rate=6e-5, min_learning_rate=6e-6, warmup_steps=min(1000, steps // 10),
      schedule="linear", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
      microbatches=1, log_every=50, checkpoint_every=1000, keep_checkpoints=3,
      async_checkpoints=True, init_from="",
  )
  c.mesh = dict(data=1, fsdp=-1, tensor=1, rules=dict(DEFAULT_RULES))
  return c
