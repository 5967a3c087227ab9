#!/usr/bin/env bash
# The README's test command: installs everything on a fresh machine, then runs the suite.
#   bash scripts/test.sh            # all CPU tests (GPU tests skip without CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # the local CPU wheel; an unpinned torch pulls CUDA packages
python3 -m pip install -q -e ".[test]"
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"   # Triton kernels run on the CPU under the interpreter
python3 -m pytest "$@"
