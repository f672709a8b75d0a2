#!/usr/bin/env bash
# Set up (if needed) and start the OpenAI-compatible server on the default models at http://127.0.0.1:8000/v1
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/inferd serve "$@"
