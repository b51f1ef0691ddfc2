#!/usr/bin/env bash
# sptlm on Cloud TPU VM slices: create, install, run, logs, stop, delete, babysit (see README.md).
#   bash launch/tpu_vm.sh COMMAND --help
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/tpu_vm.py" "$@"
