#!/usr/bin/env bash
# Set up (if needed) and run the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
ruff check inferd tests benchmarks
python -m pytest -q "$@"
