"""`sptlm tokenizer import`: a released WhisperVQ checkpoint folder -> a tokenizer work directory.

  OUT/config.json              the release's config.json, verbatim
  OUT/model.safetensors        float32, the released key layout, only the tensors that tokenize
                               (conv1, conv2, embed_positions, layers < quantize_position,
                               codebook): a valid WhisperVQ folder again, for sptlm or the
                               reference loader
  OUT/preprocessor_config.json the release's, when it has one (checked against the features)
  OUT/whisper_vq_import.json   what was imported from where; marks the directory for
                               `SpeechTokenizer.load`

Everything is checked before anything is written, and the directory appears under its name only
when complete: a bad input is one line and no OUT.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

from sptlm.speech.whisper_vq import config as config_lib
from sptlm.speech.whisper_vq import features, weights
from sptlm.speech.whisper_vq.config import ImportCheckError
from sptlm.speech.whisper_vq.tokenizer import IMPORT_FILE, WEIGHTS_FILE

PREPROCESSOR_FILE = "preprocessor_config.json"
# What the reference's WhisperFeatureExtractor must be for `features.log_mel` to equal it.
_FEATURES = {"sampling_rate": features.SAMPLE_RATE, "hop_length": features.HOP,
             "n_fft": features.N_FFT, "dither": 0.0, "padding_value": 0.0}


def _check_preprocessor(path: pathlib.Path, num_mels: int) -> dict[str, Any] | None:
  if not path.is_file():
    return None
  raw = config_lib.read_json_object(path)
  want = dict(_FEATURES, feature_size=num_mels)
  for key, value in want.items():
    if key in raw and raw[key] != value:
      raise ImportCheckError(f"{path}: {key}={raw[key]!r}; sptlm computes Whisper's features "
                             f"with {key}={value!r}")
  if raw.get("do_normalize"):
    raise ImportCheckError(f"{path}: do_normalize=true; sptlm computes Whisper's features "
                           "without waveform normalization")
  return raw


def import_checkpoint(source: str | pathlib.Path, out: str | pathlib.Path) -> dict[str, Any]:
  """Checks `source` and writes the work directory `out`; returns a summary."""
  src, out = pathlib.Path(source), pathlib.Path(out)
  cfg, raw = config_lib.read(src)
  preprocessor = _check_preprocessor(src / PREPROCESSOR_FILE, cfg.num_mel_bins)
  tensors = weights.read(src, cfg)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ImportCheckError(f"--workdir {out} exists and is not empty; choose a new directory")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    if preprocessor is not None:
      (tmp / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor, indent=2) + "\n",
                                           encoding="utf-8")
    weights.write(tmp / WEIGHTS_FILE, tensors)
    summary = {
        "kind": "whisper_vq", "source": str(src.resolve()),
        "source_files": [p.name for p in weights.checkpoint_files(src)],
        "tensors": len(tensors),
        "parameters": int(sum(v.size for v in tensors.values())),
        "codebook_size": cfg.codebook_size, "tokens_per_second": 12.5,
        "window_seconds": features.WINDOW_SECONDS,
        "architecture": dataclasses.asdict(cfg)}
    (tmp / IMPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o755)
    if out.exists():
      out.rmdir()  # empty (checked above)
    tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dict(summary, workdir=str(out))
