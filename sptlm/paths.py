"""Resolves the relative paths in configs: from the working directory, else the checkout."""

import pathlib

from etils import epath

from sptlm.errors import MissingFileError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def resolve(path: str) -> pathlib.Path:
  """`data_pipelines/assets/x` works from any directory; absolute paths pass through."""
  p = pathlib.Path(path).expanduser()
  if p.is_absolute() or p.exists():
    return p
  return ROOT / p


def local_copy(path: epath.Path) -> pathlib.Path:
  """A local path for a file that may live on gs:// (SentencePiece and the ARPA reader open
  local files only): remote files are copied to a temporary directory."""
  if not path.exists():
    raise MissingFileError(f"file not found: {path}")
  if str(path).startswith("gs://"):
    import tempfile
    tmp = pathlib.Path(tempfile.mkdtemp()) / path.name
    tmp.write_bytes(path.read_bytes())
    return tmp
  return pathlib.Path(str(path))


def absolute(path: str) -> epath.Path:
  """A work directory as Orbax wants it: gs:// as is, a local path made absolute."""
  text = str(path)
  if "://" in text:
    return epath.Path(text)
  import os
  return epath.Path(os.path.abspath(os.path.expanduser(text)))
