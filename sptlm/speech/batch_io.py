"""Batch jobs' input lists and JSON-lines output (`tokenizer encode`, `tokenizer transcribe`).

One JSON line per input, flushed as soon as it is done, so a killed job loses nothing; with
--output FILE a rerun keeps FILE's complete lines and skips the inputs they finished (failed
ones are retried). A bad input gets an {"error": ...} line and a line on stderr.
"""

import argparse
import json
import pathlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from sptlm.errors import MissingFileError, UserError


class Output:
  """JSON lines to stdout or a file; a file is resumed: complete lines stay, inputs done are
  skipped, a torn last line (a killed job) is cut off."""

  def __init__(self, path: str | None, key: str):
    self.done: set[Any] = set()
    self.failed = 0
    if path is None:
      self.file: TextIO = sys.stdout
      return
    p = pathlib.Path(path)
    try:
      self._resume(p, key)
      self.file = p.open("a", encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"--output {path}: {getattr(e, 'strerror', None) or e}") from None

  def _resume(self, p: pathlib.Path, key: str) -> None:
    """Keeps an interrupted job's complete lines and notes the inputs they finished."""
    if p.exists():
      text = p.read_text(encoding="utf-8")
      complete = text[:text.rfind("\n") + 1]
      if complete != text:
        p.write_text(complete, encoding="utf-8")
      for line in complete.splitlines():
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if "error" not in row and key in row:
          self.done.add(row[key])

  def write(self, row: dict, command: str) -> None:
    if "error" in row:
      self.failed += 1
      print(f"sptlm tokenizer {command}: {row['error']}", file=sys.stderr, flush=True)
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()

  def close(self) -> None:
    if self.file is not sys.stdout:
      self.file.close()


def inputs(args: argparse.Namespace) -> list[str]:
  files = list(args.audio)
  if args.list:
    try:
      lines = pathlib.Path(args.list).read_text(encoding="utf-8").splitlines()
    except OSError as e:
      raise UserError(f"--list {args.list}: {e.strerror}") from None
    files += [line.strip() for line in lines if line.strip()]
  return files


def progress(items: Iterable, total: int, unit: str) -> Iterator:
  from tqdm import tqdm
  return iter(tqdm(items, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
                   disable=total < 2))


def finish(out: Output, total: int, command: str) -> int:
  out.close()
  if out.failed:
    print(f"sptlm tokenizer {command}: {out.failed} of {total} inputs failed (see their "
          "\"error\" lines)", file=sys.stderr)
    return 1
  return 0


def token_lines(path: str) -> Iterator[tuple[int, dict]]:
  p = pathlib.Path(path)
  if not p.is_file():
    raise MissingFileError(f"--tokens {path}: no such file")
  with p.open(encoding="utf-8") as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        row = {"error": f"line {i + 1} of {path} is not JSON"}
      yield i, row if isinstance(row, dict) else {"error": f"line {i + 1} is not an object"}
