#!/usr/bin/env bash
# Creates .venv with sptlm and the pinned dependencies (EXTRAS=test adds the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
# espeak-ng renders the speech tokenizer's real-audio corpus (sptlm tokenizer build-corpus).
if ! command -v espeak-ng >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing espeak-ng with apt-get (text-to-speech for sptlm tokenizer build-corpus)" >&2
    apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null
  else
    echo "setup: espeak-ng is missing; install it (e.g. sudo apt-get install espeak-ng) to build speech corpora" >&2
  fi
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "${EXTRAS:-}" ]; then
  .venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
else
  .venv/bin/python -m pip install -q -e .
fi
