#!/usr/bin/env bash
# The README's test command: installs everything on a fresh machine, then runs the suite.
#   bash scripts/test.sh                         # all CPU tests (GPU tests skip without CUDA)
#   MCL_TRITON=3.8.0 bash scripts/test.sh        # the same with another triton release forced over the pin
# Every package is installed at the version in constraints.txt (the versions the suite passed with); refresh them
# with `bash scripts/refresh_constraints.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -c constraints.txt torch==2.13.0   # the local CPU wheel; an unpinned torch pulls CUDA
python3 -m pip install -q -c constraints.txt -e ".[test]"
python3 -m bench.llama_build   # llama-cpp-python at its constraints.txt pin, built for this CPU (AMX off), cached per CPU
if [[ -n "${MCL_TRITON:-}" ]]; then
    python3 -m pip install -q "triton==${MCL_TRITON}"
fi
python3 -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}')"
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"   # Triton kernels run on the CPU under the interpreter
python3 -m pytest "$@"
