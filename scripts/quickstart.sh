#!/usr/bin/env bash
# Quick start: set up, then train the embedded default (configs/tiny.py) on this machine's CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
exec .venv/bin/sptlm train --workdir "${WORKDIR:-runs/tiny}" "$@"
