"""Tokenizer files for a Hugging Face folder: the text tokenizer plus speech and special tokens.

The text part is the imported model's own tokenizer when the run descends from `from-hf`,
else the config's SentencePiece model, converted so that AutoTokenizer encodes exactly as
SentencePieceProcessor.encode does (each text stretch between added tokens gets SentencePiece's
dummy prefix, as when sptlm encodes the stretches one by one). Speech tokens `<|audio_i|>` and
the sptlm specials are added tokens at their sptlm ids; text ids the text tokenizer does not use
are filled with `<|text_unused_i|>` so the ids line up.
"""

import base64
import binascii
import json
import logging
import pathlib
import re
import tempfile
from typing import Any

from etils import epath

from data_pipelines.vocabulary import Vocabulary
from sptlm import paths
from sptlm.config import Config
from sptlm.convert import ConversionError, chatglm, checkpoints, lineage

log = logging.getLogger(__name__)


def speech_token(i: int) -> str:
  return f"<|audio_{i}|>"


_MARKER = re.compile(r"<\|[^|\s]+\|>")


def token_ids(folder: pathlib.Path) -> tuple[dict[str, int], int]:
  """({`<|...|>` token: id}, largest id + 1) of a tokenizer folder, read as plain files.

  No tokenizer class is run (GLM-4's needs custom code): tokenizer.json (vocab and added
  tokens), tokenizer_config.json's added_tokens_decoder, added_tokens.json and a tiktoken
  tokenizer.model ("base64-token rank" lines, as GLM-4's) all say which id a string has.
  """
  named: dict[str, int] = {}
  size = 0

  def see(token: str, i: int) -> None:
    nonlocal size
    size = max(size, i + 1)
    if _MARKER.fullmatch(token):
      named[token] = i

  def load(name: str) -> Any:
    path = folder / name
    if not path.is_file():
      return None
    try:
      return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConversionError(f"{path}: not readable JSON ({e})") from None

  data = load("tokenizer.json") or {}
  vocab = (data.get("model") or {}).get("vocab")
  if isinstance(vocab, dict):  # BPE, WordPiece: token -> id
    for token, i in vocab.items():
      see(token, int(i))
  elif isinstance(vocab, list):  # Unigram: [piece, score] by id
    for i, entry in enumerate(vocab):
      see(entry[0], i)
  for entry in data.get("added_tokens") or []:
    see(entry["content"], int(entry["id"]))
  for i, entry in ((load("tokenizer_config.json") or {}).get("added_tokens_decoder")
                   or {}).items():
    see(entry["content"] if isinstance(entry, dict) else str(entry), int(i))
  for token, i in (load("added_tokens.json") or {}).items():
    see(token, int(i))
  model = folder / "tokenizer.model"
  if model.is_file():
    for token, i in _tiktoken_ranks(model):
      see(token, i)
  return named, size


def _tiktoken_ranks(path: pathlib.Path) -> list[tuple[str, int]]:
  """A tiktoken BPE file's (token, rank) pairs; [] for anything else (SentencePiece's proto)."""
  out = []
  try:
    lines = path.read_bytes().decode("ascii").splitlines()
    for line in lines:
      if not line:
        continue
      token, rank = line.split()
      out.append((base64.b64decode(token, validate=True).decode("utf-8", "replace"), int(rank)))
  except (UnicodeDecodeError, ValueError, binascii.Error):
    return []
  return out


def from_sentencepiece(model_path: pathlib.Path) -> Any:
  """A transformers TokenizersBackend that encodes and decodes like the SentencePiece model."""
  from sentencepiece import sentencepiece_model_pb2
  from tokenizers import AddedToken
  from transformers import PreTrainedTokenizerFast
  from transformers.convert_slow_tokenizer import SpmConverter

  if not model_path.is_file():
    raise ConversionError(f"text tokenizer not found: {model_path} (set vocab.text_tokenizer)")
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_path.read_bytes())
  pieces = [(p.piece, p.score) for p in proto.pieces]
  backend = SpmConverter.build_tokenizer_from_spm_proto(proto, pieces, legacy=True)
  if backend is None:
    raise ConversionError(f"{model_path}: unsupported SentencePiece model type")
  # Control and unknown pieces (<pad>, <unk>, <s>, </s>) are special tokens, as in transformers.
  control = [p.piece for p in proto.pieces if p.type in (2, 3)]
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
  spec = proto.trainer_spec

  def piece(i: int) -> str | None:
    return proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None

  return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=piece(spec.bos_id),
                                 eos_token=piece(spec.eos_id), unk_token=piece(spec.unk_id),
                                 pad_token=piece(spec.pad_id))


def from_pretrained(source: epath.Path) -> Any:
  """The imported model's tokenizer (copied to a local folder first when it is remote)."""
  from transformers import AutoTokenizer

  with tempfile.TemporaryDirectory() as tmp:
    local = pathlib.Path(tmp)
    for name in lineage.CARRIED_FILES:
      if (source / name).exists():
        data = (source / name).read_bytes()
        if name == "config.json" and chatglm.is_chatglm(json.loads(data)):
          continue  # a model type transformers does not know: the tokenizer files suffice
        (local / name).write_bytes(data)
    try:
      return AutoTokenizer.from_pretrained(str(local), trust_remote_code=False)
    except (OSError, ValueError) as e:
      raise ConversionError(f"the tokenizer recorded in {source} does not load without custom "
                            f"code ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def extend(tok: Any, vocab: Vocabulary) -> list[str]:
  """Adds fillers, speech and special tokens at their sptlm ids; returns renamed specials.

  Ids the text tokenizer already covers stay as they are: an adopted layout's speech tokens
  and specials (GLM-4-Voice's) must be there at the layout's ids.
  """
  from tokenizers import AddedToken

  n = len(tok)
  if n > vocab.text_size:
    raise ConversionError(f"the text tokenizer has {n} tokens but vocab.text_size is "
                          f"{vocab.text_size}; speech ids would overlap text ids")
  existing = tok.get_vocab()
  renamed, block = [], []
  for name in vocab.specials:
    if name in existing:  # e.g. GLM-4's own <|user|>: one string cannot have two ids
      new = f"<|sptlm_{name.strip('<|>')}|>"
      renamed.append(f"{name} -> {new}")
      name = new
    block.append(name)
  speech_end = vocab.speech_start + vocab.speech_size
  wanted: dict[int, tuple[str, bool]] = {}  # id -> (token, special)
  for k in range(vocab.speech_size):
    wanted[vocab.speech_start + k] = (speech_token(k), False)
  for j, name in enumerate(block):
    wanted[vocab.special_start + j] = (name, True)
  expected = {i: t for i, (t, _) in wanted.items()
              if i in (vocab.speech_start, speech_end - 1, vocab.special_start)}
  expected.update({i: name for name, i in vocab.adopted})
  if block and vocab.special_start < n:
    raise ConversionError(f"the text tokenizer already uses id {vocab.special_start}, where "
                          f"the layout places {block[0]} (vocab.special_offset)")
  runs: list[tuple[bool, list[Any]]] = []
  for i in range(n, max(wanted, default=n - 1) + 1):
    token, special = wanted.get(i, (f"<|text_unused_{i}|>", True))
    if not runs or runs[-1][0] != special:
      runs.append((special, []))
    runs[-1][1].append(AddedToken(token, special=special, normalized=False))
  for special, tokens in runs:
    tok.add_tokens(tokens, special_tokens=special)
  for i, token in expected.items():
    got = tok.convert_tokens_to_ids(token)
    if got != i:
      raise ConversionError(f"tokenizer: {token} got id {got}, sptlm's layout has {i}")
  if renamed:
    log.warning("the text tokenizer already has %s; the sptlm ids of these are named %s",
                ", ".join(r.split(" ")[0] for r in renamed), ", ".join(renamed))
  return renamed


def build(cfg: Config, source: epath.Path | None) -> tuple[Any, str]:
  """The extended tokenizer of a run, and where its text part came from."""
  vocab = checkpoints.vocabulary(cfg)
  if lineage.has_tokenizer(source):
    tok, origin = from_pretrained(source), f"{source} (imported with from-hf)"
  else:
    path = paths.resolve(cfg.vocab.text_tokenizer)
    tok, origin = from_sentencepiece(path), str(path)
  extend(tok, vocab)
  return tok, origin


def save(tok: Any, out_dir: pathlib.Path) -> None:
  """Saves the tokenizer files; a converted SentencePiece one names the class transformers 4
  knows too (PreTrainedTokenizerFast, an alias of transformers 5's TokenizersBackend)."""
  tok.save_pretrained(str(out_dir))
  path = out_dir / "tokenizer_config.json"
  config = json.loads(path.read_text())
  if config.get("tokenizer_class") == "TokenizersBackend":
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

