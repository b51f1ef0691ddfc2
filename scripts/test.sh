#!/usr/bin/env bash
# Sets up (with the test extras) and runs the default test suite; pass pytest arguments through
# (e.g. `bash scripts/test.sh -m slow` for the slow tests).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
export JAX_PLATFORMS=cpu
# Two worker processes, each test file whole on one of them (module fixtures train once); the
# suite's subprocesses and XLA leave a single process well short of two busy cores.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${SPTLM_TEST_WORKERS:-2}" \
  --dist loadfile "$@"
