#!/usr/bin/env bash
# sptlm as an xpk workload on GKE: build-image, create, list, logs, delete (see README.md).
#   bash launch/xpk.sh COMMAND --help
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/xpk_workload.py" "$@"
