"""A WhisperVQ tokenizer of the released architecture in PyTorch, for sptlm's parity tests.

Built from transformers' `WhisperEncoderLayer` (attention, MLP, layer norms) plus the pieces
the release adds, written here from its description: causal kernel-3 convolutions (two frames
of left padding), a learned position table, block-causal attention over
`quantize_causal_block_size` 50 Hz frames (block // 4 after pooling), average pooling x4 at
`pooling_position`, and the nearest code of the raw vectors at `quantize_position`
(argmin of |e|^2 + |h|^2 - 2 h.e). `save` writes random weights in the released key layout
(`model.encoder.*`, a token of `model.decoder.*`), in two safetensors shards, with its
config.json; `tokenize` runs the reference's recipe (30 s windows, transformers'
WhisperFeatureExtractor with padding to whole tokens, the attention mask).
"""

import json
import math
import pathlib
from typing import Any

import numpy as np
import torch
from torch import nn

SAMPLES_PER_TOKEN = 1280
WINDOW_SAMPLES = 30 * 16000


def small_config(**overrides: Any) -> dict[str, Any]:
  """config.json of a small tokenizer: GLM-4-Voice's keys and switches, whisper-tiny sizes."""
  cfg = {
      "architectures": ["WhisperVQEncoder"], "model_type": "whisper",
      "activation_function": "gelu", "d_model": 64, "encoder_attention_heads": 4,
      "encoder_ffn_dim": 256, "encoder_layers": 4, "decoder_layers": 1,
      "decoder_attention_heads": 4, "decoder_ffn_dim": 256, "num_mel_bins": 128,
      "max_source_positions": 1500, "max_target_positions": 448, "vocab_size": 100,
      "scale_embedding": False, "torch_dtype": "float32",
      "pooling_kernel_size": 4, "pooling_type": "avg", "pooling_position": 1,
      "quantize_position": 2, "quantize_vocab_size": 256, "quantize_causal_block_size": 200,
      "quantize_causal_encoder": False, "quantize_commit_coefficient": 0.25,
      "quantize_ema_decay": 0.99, "quantize_encoder_only": False,
      "encoder_causal_attention": False, "encoder_causal_convolution": True}
  cfg.update(overrides)
  return cfg


def sinusoids(length: int, channels: int) -> torch.Tensor:
  inc = math.log(10_000) / (channels // 2 - 1)
  t = torch.arange(length)[:, None] * torch.exp(-inc * torch.arange(channels // 2))[None, :]
  return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class ReferenceWhisperVQ(nn.Module):
  def __init__(self, cfg: dict[str, Any]):
    super().__init__()
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer
    self.cfg = cfg
    d, m = cfg["d_model"], cfg["num_mel_bins"]
    wcfg = WhisperConfig(d_model=d, encoder_attention_heads=cfg["encoder_attention_heads"],
                         encoder_ffn_dim=cfg["encoder_ffn_dim"], num_mel_bins=m,
                         activation_function=cfg["activation_function"], dropout=0.0,
                         attention_dropout=0.0, activation_dropout=0.0)
    wcfg._attn_implementation = "eager"
    self.causal_conv = cfg["encoder_causal_convolution"]
    pad = 0 if self.causal_conv else 1
    self.conv1 = nn.Conv1d(m, d, 3, padding=pad)
    self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=pad)
    positions = cfg["max_source_positions"]
    self.embed_positions = nn.Embedding(positions, d)
    self.embed_positions.weight.data.copy_(sinusoids(positions, d))
    self.layers = nn.ModuleList([WhisperEncoderLayer(wcfg) for _ in range(cfg["encoder_layers"])])
    self.layer_norm = nn.LayerNorm(d)
    k = cfg["quantize_vocab_size"]
    self.codebook = nn.Embedding(k, d)
    self.embed_positions2 = nn.Embedding(math.ceil(positions / 4), d)
    self.register_buffer("ema_count", torch.ones(k))
    self.register_buffer("ema_weight", torch.zeros(k, d))
    self.eval()

  def _conv(self, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    if self.causal_conv:
      x = nn.functional.pad(x, (2, 0))
    return conv(x)

  def _mask(self, valid_BxL: torch.Tensor, block: int | None) -> torch.Tensor:
    """Additive [B, 1, L, L]: 0 where a query may see a key, the dtype's minimum elsewhere."""
    length = valid_BxL.shape[1]
    pos = torch.arange(length)
    if self.cfg["encoder_causal_attention"] or self.cfg["quantize_causal_encoder"]:
      seen = (pos[None, :, None] >= pos[None, None, :]).expand(valid_BxL.shape[0], -1, -1)
    else:
      seen = valid_BxL[:, None, :].expand(-1, length, -1)
      if block:
        seen = seen & ((pos[:, None] // block) >= (pos[None, :] // block))[None]
    return torch.where(seen, 0.0, torch.finfo(torch.float32).min)[:, None]

  @torch.no_grad()
  def forward(self, features_BxMxF: torch.Tensor, mask_BxF: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B, N], the quantizer's input [B, N, D])."""
    cfg = self.cfg
    x = nn.functional.gelu(self._conv(self.conv1, features_BxMxF))
    x = nn.functional.gelu(self._conv(self.conv2, x)).permute(0, 2, 1)
    x = x + self.embed_positions.weight[:x.shape[1]]
    valid = mask_BxF[:, ::2].bool()
    block = cfg["quantize_causal_block_size"]
    mask = self._mask(valid, block)
    for i, layer in enumerate(self.layers[:cfg["quantize_position"]]):
      x = layer(x, mask)
      if i + 1 == cfg["pooling_position"]:
        k = cfg["pooling_kernel_size"]
        x = nn.functional.avg_pool1d(x.permute(0, 2, 1), k).permute(0, 2, 1)
        valid = valid[:, ::k]
        mask = self._mask(valid, block // k if block else None)
    e = self.codebook.weight
    dist = torch.addmm((e ** 2).sum(1) + (x.reshape(-1, x.shape[-1]) ** 2).sum(1, keepdim=True),
                       x.reshape(-1, x.shape[-1]), e.t(), alpha=-2.0, beta=1.0)
    return dist.argmin(dim=1).reshape(x.shape[:2]), x

  def features(self, window: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor(feature_size=self.cfg["num_mel_bins"])
    out = fe([window], sampling_rate=16000, return_attention_mask=True, padding="longest",
             pad_to_multiple_of=SAMPLES_PER_TOKEN, return_tensors="pt")
    return out["input_features"], out["attention_mask"]

  def tokenize(self, audio: np.ndarray, features_fn=None) -> tuple[np.ndarray, np.ndarray]:
    """The reference recipe for one input: (ids [N], the quantizer's input [N, D]); with
    `features_fn(window) -> [F, M]` the model gets those features instead of transformers'."""
    ids, hidden = [], []
    for start in range(0, len(audio), WINDOW_SAMPLES):
      window = audio[start:start + WINDOW_SAMPLES]
      feats, mask = self.features(window)
      if features_fn is not None:
        feats = torch.from_numpy(features_fn(window).T[None].copy())
      codes, h = self(feats, mask)
      keep = mask[0, ::8].bool()
      ids.append(codes[0][keep].numpy())
      hidden.append(h[0][keep].numpy())
    return np.concatenate(ids), np.concatenate(hidden)

  def save(self, folder: pathlib.Path) -> None:
    """config.json and two safetensors shards in the released key layout."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"model.encoder.{k}": v.contiguous() for k, v in self.state_dict().items()}
    d = self.cfg["d_model"]
    state["model.decoder.embed_tokens.weight"] = torch.zeros(self.cfg["vocab_size"], d)
    state["model.decoder.layer_norm.weight"] = torch.ones(d)
    names = sorted(state)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
      name = f"model-0000{i + 1}-of-00002.safetensors"
      save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(self.cfg, indent=2))


def build(cfg: dict[str, Any], calibration: np.ndarray, seed: int = 0) -> ReferenceWhisperVQ:
  """Random weights; the codebook drawn from the model's own pooled vectors on `calibration`
  (plus noise), so codes are used as a trained codebook's are and near-ties are realistic."""
  torch.manual_seed(seed)
  model = ReferenceWhisperVQ(cfg)
  _, h = model.tokenize(calibration)
  k = cfg["quantize_vocab_size"]
  g = torch.Generator().manual_seed(seed)
  pick = torch.randperm(len(h), generator=g)[:k]
  codes = torch.from_numpy(h)[pick]
  codes = codes + 0.1 * codes.std() * torch.randn(codes.shape, generator=g)
  model.codebook.weight.data.copy_(codes)
  return model
