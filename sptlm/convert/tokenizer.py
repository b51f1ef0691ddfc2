"""Tokenizer files for a Hugging Face folder: the text tokenizer plus speech and special tokens.

The text part is the imported model's own tokenizer when the run descends from `from-hf`,
else the config's SentencePiece model, converted so that AutoTokenizer encodes exactly as
SentencePieceProcessor.encode does (each text stretch between added tokens gets SentencePiece's
dummy prefix, as when sptlm encodes the stretches one by one). Speech tokens `<|audio_i|>` and
the sptlm specials are added tokens at their sptlm ids; text ids the text tokenizer does not use
are filled with `<|text_unused_i|>` so the ids line up.
"""

import json
import logging
import pathlib
import tempfile
from typing import Any

from etils import epath

from data_pipelines.vocabulary import Vocabulary
from sptlm import paths
from sptlm.config import Config
from sptlm.convert import ConversionError, lineage
from sptlm.train import program as program_lib

log = logging.getLogger(__name__)


def speech_token(i: int) -> str:
  return f"<|audio_{i}|>"


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
        (local / name).write_bytes((source / name).read_bytes())
    try:
      return AutoTokenizer.from_pretrained(str(local), trust_remote_code=False)
    except (OSError, ValueError) as e:
      raise ConversionError(f"the tokenizer recorded in {source} does not load without custom "
                            f"code ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def extend(tok: Any, vocab: Vocabulary) -> list[str]:
  """Adds fillers, speech and special tokens at their sptlm ids; returns renamed specials."""
  from tokenizers import AddedToken

  n = len(tok)
  if n > vocab.text_size:
    raise ConversionError(f"the text tokenizer has {n} tokens but vocab.text_size is "
                          f"{vocab.text_size}; speech ids would overlap text ids")
  existing = tok.get_vocab()
  fillers = [AddedToken(f"<|text_unused_{i}|>", special=True, normalized=False)
             for i in range(n, vocab.text_size)]
  speech = [AddedToken(speech_token(i), special=False, normalized=False)
            for i in range(vocab.speech_size)]
  renamed, specials = [], []
  for name in vocab.specials:
    if name in existing:  # e.g. GLM-4's own <|user|>: one string cannot have two ids
      new = f"<|sptlm_{name.strip('<|>')}|>"
      renamed.append(f"{name} -> {new}")
      name = new
    specials.append(AddedToken(name, special=True, normalized=False))
  for tokens, special in ((fillers, True), (speech, False), (specials, True)):
    if tokens:
      tok.add_tokens(tokens, special_tokens=special)
  expected = {vocab.speech_start: speech_token(0), vocab.special_start: specials[0].content}
  if vocab.speech_size:
    expected[vocab.special_start - 1] = speech_token(vocab.speech_size - 1)
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
  vocab = program_lib.vocabulary(cfg)
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

