"""Resolves the relative paths in configs: from the working directory, else the checkout."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def resolve(path: str) -> pathlib.Path:
  """`data_pipelines/assets/x` works from any directory; absolute paths pass through."""
  p = pathlib.Path(path).expanduser()
  if p.is_absolute() or p.exists():
    return p
  return ROOT / p
