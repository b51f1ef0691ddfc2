"""Pallas kernels for sptlm. Imports nothing from `sptlm`: kernels stand on their own."""
