"""Data for sptlm: vocabulary layout, text input, and (later) interleaved speech-text tasks."""
