#!/usr/bin/env bash
# Re-resolve every dependency at its newest allowed release (setup.py's ranges), write the versions to
# constraints.txt, and run the suite with them: the one command to move the pins.
#   bash scripts/refresh_constraints.sh          # then commit constraints.txt if the suite passed
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d -t mcl-pins-XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
export VIRTUAL_ENV="$tmp/venv" PATH="$tmp/venv/bin:$PATH"
hash -r
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"          # the bench extra's other packages are the test extra's
python3 -m bench.llama_build --newest           # llama-cpp-python: the newest release in the bench range, built for this CPU
{
    echo "# The versions the test suite passed with (bash scripts/refresh_constraints.sh writes this file)."
    echo "# scripts/test.sh and scripts/main.sh install with 'pip install -c constraints.txt'."
    # `pip list --format=freeze`, not `pip freeze`: the llama-cpp-python wheel came from a file, and freeze would
    # write its path (name @ file://...) where the pin belongs
    python3 -m pip list --format=freeze --exclude-editable | grep -vE '^(pip|setuptools|wheel)==' | LC_ALL=C sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
bash scripts/test.sh
echo "constraints.txt refreshed; the suite passed with it"
