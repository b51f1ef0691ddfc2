"""The transformer, its attention backends and incremental decoding."""
