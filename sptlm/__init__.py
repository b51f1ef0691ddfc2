"""sptlm: pre-training interleaved speech-text language models in JAX."""

__version__ = "0.1.0"
