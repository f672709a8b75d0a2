#!/usr/bin/env bash
# Set up (if needed) and run the linter, the whole test suite on this CPU's best kernel tier, then the kernel and
# engine tests once more on every lower tier this CPU can execute (INFERD_ISA, see inferd/ops/kernels.py),
# down to `torch` (no C kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
. .venv/bin/activate
ruff check inferd tests benchmarks
python -m pytest -q "$@"
best=$(python -c "from inferd.ops.kernels import get_kernels; print(get_kernels().tier)")
for tier in $(python -m inferd.ops.kernels); do
  [ "$tier" = "$best" ] && continue
  echo "== kernel tier $tier: tests/test_kernels.py tests/test_engine.py tests/test_attention.py"
  INFERD_ISA=$tier python -m pytest -q tests/test_kernels.py tests/test_engine.py tests/test_attention.py
done
