"""`sptlm convert to-hf`: a workdir's checkpoint -> a Hugging Face folder, no custom code.

The class is the standard one whose math is exactly the model's (families.for_model; the
family an import recorded wins when it can express the model). Parameters stream from the
Orbax checkpoint one leaf at a time (a leaf stacks all layers of one tensor; GLM's gate and up
go together) into size-limited safetensors shards, so the peak memory is the largest leaf
(plus Orbax's transient copy of it while restoring) and one shard buffer, never the model.
"""

import dataclasses
import json
import logging
import pathlib
from typing import Any

import ml_dtypes
import numpy as np

from sptlm.config import Config
from sptlm.convert import ConversionError, chatglm, checkpoints, families, layout, lineage
from sptlm.convert import tokenizer
from sptlm.convert import safetensors_io

log = logging.getLogger(__name__)

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Keys of a recorded Hugging Face config that describe its file, not the model we write.
_DROPPED_KEYS = ("transformers_version", "torch_dtype", "dtype", "_name_or_path", "model_type",
                 "rope_scaling", "rope_theta", "partial_rotary_factor", "auto_map")


@dataclasses.dataclass(frozen=True)
class ExportReport:
  out: str
  architecture: str
  step: int
  dtype: str
  files: list[str]
  tensors: int
  total_bytes: int
  peak_read_bytes: int  # the most checkpoint leaves held at once (one group's)
  peak_shard_bytes: int  # the largest shard buffer held at once
  tokenizer: str

  def summary(self) -> str:
    gb = 1e9
    return "\n".join([
        f"sptlm convert to-hf: {self.architecture}, step {self.step}, {self.dtype}",
        f"  weights    {self.tensors} tensors, {self.total_bytes / gb:.3f} GB in "
        f"{len(self.files)} file(s)",
        f"  peak held  {self.peak_read_bytes / gb:.3f} GB of checkpoint leaves + "
        f"{self.peak_shard_bytes / gb:.3f} GB shard buffer",
        f"  tokenizer  {self.tokenizer}",
        f"  written to {self.out}",
    ])


def _prepare(out: str, overwrite: bool) -> pathlib.Path:
  out_dir = pathlib.Path(out)
  if "://" in out:
    raise ConversionError(f"--out {out!r}: write the Hugging Face folder to a local path")
  if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
    raise ConversionError(f"--out {out_dir} is not empty; choose another folder or pass "
                          "--overwrite")
  out_dir.mkdir(parents=True, exist_ok=True)
  for stale in list(out_dir.glob("*.safetensors")) + list(out_dir.glob("shard-*.tmp")):
    stale.unlink()
  (out_dir / safetensors_io.INDEX).unlink(missing_ok=True)
  return out_dir


def hf_config(fam: families.Family, cfg: Config, source: Any, dtype: str, tok: Any) -> Any:
  """The transformers config object: the recorded source config with the math set by us."""
  from transformers import CONFIG_MAPPING

  vocab = checkpoints.vocabulary(cfg)
  kwargs = families.hf_config_kwargs(fam, cfg.model, vocab.size)
  base: dict[str, Any] = {"max_position_embeddings": cfg.data.seq_len}
  record: dict[str, Any] = lineage.read_record(source) if source is not None else {}
  if record.get("family") == fam.name:
    base = json.loads((source / "config.json").read_text())
    if record.get("layout") == "chatglm":  # its keys are ChatGLM's: keep what GLM shares
      base = {"max_position_embeddings": cfg.data.seq_len, **chatglm.glm_config_base(base)}
    for key in _DROPPED_KEYS:
      base.pop(key, None)
  if not lineage.has_tokenizer(source):  # the token ids are those of our SentencePiece model
    base.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
  return CONFIG_MAPPING[fam.name](**{**base, **kwargs, "dtype": dtype})


def _add_legacy_rope_keys(path: pathlib.Path) -> None:
  """Top-level rope_theta (and partial_rotary_factor) as transformers 4 and other readers
  expect them; transformers 5 reads rope_parameters, which says the same."""
  config = json.loads(path.read_text())
  rope = config.get("rope_parameters") or {}
  for key in ("rope_theta", "partial_rotary_factor"):
    if key in rope:
      config[key] = rope[key]
  path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export(workdir: str, out: str, *, dtype: str = "float32", step: int | None = None,
           max_shard_bytes: int = 5 * 10**9, overwrite: bool = False) -> ExportReport:
  """Writes config.json, safetensors weights and tokenizer files for transformers."""
  if dtype not in DTYPES:
    raise ConversionError(f"--dtype {dtype!r}: use {' or '.join(DTYPES)}")
  cfg = checkpoints.read_config(workdir)
  reader = checkpoints.ParamReader(workdir, step)
  checkpoints.check_shapes(cfg, reader.shapes, str(reader.path))
  source = lineage.find(workdir)
  recorded = lineage.read_record(source).get("family") if source is not None else None
  fam = families.for_model(cfg.model, recorded)
  if recorded and recorded != fam.name:
    log.warning("imported as %s, but the model's config now needs %s", recorded, fam.name)
  out_dir = _prepare(out, overwrite)

  tok, tok_origin = tokenizer.build(cfg, source)
  config = hf_config(fam, cfg, source, dtype, tok)
  config.save_pretrained(str(out_dir))
  _add_legacy_rope_keys(out_dir / "config.json")
  tokenizer.save(tok, out_dir)
  if lineage.has_tokenizer(source) and (source / "generation_config.json").exists():
    (out_dir / "generation_config.json").write_bytes(
        (source / "generation_config.json").read_bytes())

  groups = layout.groups(fam, cfg.model)
  missing = set(reader.shapes) - {p for g in groups for p in g.leaves}
  if missing:  # a parameter the layout does not know would silently vanish
    raise ConversionError(f"no Hugging Face tensor for parameter {'/'.join(sorted(missing)[0])}")
  writer = safetensors_io.ShardedWriter(out_dir, max_shard_bytes)
  target = DTYPES[dtype]
  tensors, peak_read = 0, 0
  for group in groups:
    leaves = {p: reader.read(p) for p in group.leaves}
    peak_read = max(peak_read, sum(a.nbytes for a in leaves.values()))
    for name, array in group.export(lambda p, i: leaves[p] if i is None else leaves[p][i]):
      writer.add(name, array.astype(target))
      tensors += 1
    del leaves
  files = writer.close()
  reader.close()
  return ExportReport(str(out_dir), fam.architecture, reader.step, dtype, files, tensors,
                      writer.total_bytes, peak_read, writer.peak_buffer_bytes, tok_origin)
