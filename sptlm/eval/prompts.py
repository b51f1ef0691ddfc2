"""Prompt templates as token ids: text through the tokenizer, `<|name|>` as special tokens.

A template such as "<|user|>\\n{question}<|assistant|>\\n" (a chat model) or
"Question: {question}\\nAnswer:" (a base model, the default) is cut at its special tokens and
its {question} slot; the question goes in as text ids or as speech ids
(<|begin_of_audio|> codes <|end_of_audio|>), whichever the setting asks for.
"""

import re
from collections.abc import Sequence

from data_pipelines.text_tokenizer import TextTokenizer
from data_pipelines.vocabulary import Vocabulary
from sptlm.errors import InputError

_PIECES = re.compile(r"(<\|[A-Za-z0-9_]+\|>|\{question\})")


def render(template: str, question_ids: Sequence[int], tokenizer: TextTokenizer,
           vocab: Vocabulary, key: str = "eval.qa_prompt") -> list[int]:
  """The template's ids with `question_ids` in its {question} slot (if it has one)."""
  ids: list[int] = []
  for piece in _PIECES.split(template):
    if not piece:
      continue
    if piece == "{question}":
      ids += list(question_ids)
    elif _PIECES.fullmatch(piece):
      try:
        ids.append(vocab.special_id(piece))
      except KeyError as e:
        raise InputError(f"{key}={template!r}: {e.args[0]}") from None
    else:
      ids += tokenizer.encode(piece)
  return ids


def special_ids(names: Sequence[str], vocab: Vocabulary, key: str) -> list[int]:
  try:
    return [vocab.special_id(n) for n in names]
  except KeyError as e:
    raise InputError(f"{key}: {e.args[0]}") from None
