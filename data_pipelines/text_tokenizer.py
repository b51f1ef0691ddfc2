"""The LM's text tokenizer: a SentencePiece model, or a base LM's Hugging Face tokenizer.

`vocab.text_tokenizer` names it: a `.model` file (SentencePiece: the shipped one, or one trained
by `data_pipelines/train_sentencepiece.py`), or a local folder holding `tokenizer.json` (GLM-4's,
Llama's, Qwen2's: the folder of a downloaded model; nothing is fetched at run time). Both give
ids with character offsets into the text, so a span of LM tokens maps back to the exact text it
covers (the text the text-to-token model speaks).
"""

import json
from collections.abc import Sequence
from typing import Protocol

import sentencepiece as spm
from etils import epath

from sptlm.errors import InputError, MissingFileError

# The most padding rows a text vocabulary may carry past its tokenizer's ids (GLM-4: 151,329
# ids in a 151,552-row table; Qwen2: 151,665 in 151,936): more means a different tokenizer.
MAX_PADDING = 1024


class TextTokenizer(Protocol):
  path: str

  def size(self) -> int:
    """Ids in use (the largest id + 1), added special tokens included."""

  def encode(self, text: str) -> list[int]: ...

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each id's [start, end) character span in `text`."""

  def decode(self, ids: Sequence[int]) -> str: ...

  def eos_id(self) -> int | None: ...

  def unk_id(self) -> int | None:
    """The id text the tokenizer cannot represent becomes (None: byte-level, none needed)."""


class SentencePieceTokenizer:
  def __init__(self, path: str):
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_proto=epath.Path(path).read_bytes())

  def size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return list(self.sp.encode(text))

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    proto = self.sp.encode(text, return_type="proto")
    # piece offsets are in UTF-8 bytes of the input; map them to characters
    char_at = [0] * (len(text.encode("utf-8")) + 1)
    b = 0
    for i, ch in enumerate(text):
      n = len(ch.encode("utf-8"))
      for j in range(n):
        char_at[b + j] = i
      b += n
    char_at[b] = len(text)
    return ([p.id for p in proto.pieces],
            [(char_at[p.begin], char_at[p.end]) for p in proto.pieces])

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode(list(ids))

  def eos_id(self) -> int | None:
    eos = self.sp.eos_id()
    return eos if eos >= 0 else None

  def unk_id(self) -> int | None:
    unk = self.sp.unk_id()
    return unk if unk >= 0 else None


class HuggingFaceTokenizer:
  """A `tokenizer.json` (the `tokenizers` library, no transformers needed), with the EOS token
  named by the folder's tokenizer_config.json when there is one."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer
    folder = epath.Path(path)
    file = folder / "tokenizer.json" if folder.is_dir() else folder
    self.path = path
    try:
      self.tok = Tokenizer.from_str(file.read_text())
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
      raise InputError(f"{file} is not a Hugging Face tokenizer.json: {e}") from None
    self._eos = None
    config = file.parent / "tokenizer_config.json"
    if config.exists():
      eos = json.loads(config.read_text()).get("eos_token")
      if isinstance(eos, dict):
        eos = eos.get("content")
      if eos:
        self._eos = self.tok.token_to_id(eos)

  def size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = self.tok.encode(text, add_special_tokens=False)
    return list(enc.ids), [tuple(o) for o in enc.offsets]

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=False)

  def eos_id(self) -> int | None:
    return self._eos

  def unk_id(self) -> int | None:
    unk = getattr(self.tok.model, "unk_token", None)
    return self.tok.token_to_id(unk) if unk else None


def load(path: str) -> TextTokenizer:
  """A `.model` file is SentencePiece; a folder (or file) with tokenizer.json is Hugging Face."""
  p = epath.Path(path)
  if not path or not p.exists():
    raise MissingFileError(f"text tokenizer not found: {path!r} (set vocab.text_tokenizer to a "
                           "SentencePiece .model file or a folder with tokenizer.json)")
  if p.is_dir():
    if not (p / "tokenizer.json").exists():
      raise MissingFileError(f"{path} has no tokenizer.json (vocab.text_tokenizer must be a "
                             "SentencePiece .model file or a Hugging Face tokenizer folder)")
    return HuggingFaceTokenizer(path)
  if p.name.endswith(".json"):
    return HuggingFaceTokenizer(path)
  return SentencePieceTokenizer(path)


def check_size(tok: TextTokenizer, text_size: int) -> None:
  """The text part of the vocabulary must be the tokenizer's ids plus at most MAX_PADDING
  padding rows; anything else is the wrong tokenizer for this model (one line)."""
  n = tok.size()
  if not n <= text_size < n + MAX_PADDING:
    raise InputError(f"text tokenizer {tok.path} has {n:,} ids but vocab.text_size is "
                     f"{text_size:,}: they must match up to padding (at most {MAX_PADDING - 1} "
                     f"extra rows); point vocab.text_tokenizer at the model's own tokenizer or "
                     f"set vocab.text_size={n}")
