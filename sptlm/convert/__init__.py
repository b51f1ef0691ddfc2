"""Hugging Face transformers in both directions, verified by logits.

  to_hf.export      sptlm workdir -> Hugging Face folder (config, safetensors, tokenizer)
  from_hf.import_   Hugging Face text LM -> sptlm initial checkpoint for `train.init_from`
  verify.compare    both models on the same text, speech and mixed inputs

`families` maps the model configs, `layout` the tensors, `checkpoints` reads and writes Orbax
one tensor at a time, `safetensors_io` the Hugging Face side, `tokenizer` the tokenizer files,
`lineage` what an import recorded for the way back. Only `verify` needs PyTorch.
"""

from sptlm.errors import UserError


class ConversionError(UserError, ValueError):
  """A conversion that cannot be done as asked; the message names the key, file or tensor."""
