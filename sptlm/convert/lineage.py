"""What an import records so the export goes back to the same family and tokenizer.

`from-hf` writes OUT/hf_source/: the Hugging Face config.json, its tokenizer and generation
files, and conversion.json (family, source, how new rows were made). A run started with
`train.init_from=OUT` finds it again through its config.json, however many runs deep.
"""

import json
import logging
from typing import Any

from etils import epath

log = logging.getLogger(__name__)

SOURCE_DIR = "hf_source"
RECORD = "conversion.json"
# Files of a Hugging Face folder that describe the tokenizer and generation, not the weights.
CARRIED_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                 "chat_template.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def write(out: str, hf_dir: str, record: dict[str, Any]) -> epath.Path:
  dst = epath.Path(out) / SOURCE_DIR
  dst.mkdir(parents=True, exist_ok=True)
  src = epath.Path(hf_dir)
  for name in CARRIED_FILES:
    if (src / name).exists():
      (dst / name).write_bytes((src / name).read_bytes())
  (dst / RECORD).write_text(json.dumps(record, indent=2) + "\n")
  return dst


def find(workdir: str, max_hops: int = 32) -> epath.Path | None:
  """The hf_source/ of this workdir or of the checkpoint it was initialised from, if any."""
  seen = set()
  current: str | None = workdir
  for _ in range(max_hops):
    if not current or current in seen:
      return None
    seen.add(current)
    path = epath.Path(current)
    if (path / SOURCE_DIR / RECORD).exists():
      return path / SOURCE_DIR
    config = path / "config.json"
    if not config.exists():
      return None
    try:
      current = json.loads(config.read_text()).get("train", {}).get("init_from") or None
    except (json.JSONDecodeError, AttributeError):
      log.warning("%s is not readable JSON; not following train.init_from", config)
      return None
  return None


def read_record(source: epath.Path) -> dict[str, Any]:
  return json.loads((source / RECORD).read_text())


def has_tokenizer(source: epath.Path | None) -> bool:
  return source is not None and any((source / n).exists() for n in TOKENIZER_FILES)
