#!/usr/bin/env bash
# Embeddings at batch 32 on every AVX kernel tier this CPU can run, each against sentence-transformers fp32 in the
# same process (benchmarks/embeddings_interleaved.py). A forced tier also caps oneDNN (and MKL for AVX2) to that
# ISA, on both sides, so the run stands for a CPU of that tier: avx512 = AVX-512 without VNNI/BF16 (oneDNN's int8
# GEMM then uses vpmaddubsw/vpmaddwd), avx2_fma = an AVX2-only CPU.
#   benchmarks/embeddings_tiers.sh [PEER_PYTHON] [NUM_TEXTS]   (defaults /tmp/peers/bin/python, 128)
set -euo pipefail
cd "$(dirname "$0")/.."
PEER=${1:-/tmp/peers/bin/python}
N=${2:-128}
PY=${PYTHON:-python}
M=$("$PY" -c 'from inferd.loader.hub import resolve; print(resolve("all-minilm-l6-v2"))')
TIERS=$("$PY" -m inferd.ops.kernels)
for tier in avx512_bf16_vnni avx512 avx2_fma; do
  case " $TIERS " in *" $tier "*) ;; *) echo "== $tier: not supported by this CPU, skipped"; continue ;; esac
  case $tier in
    avx512) cap=(ONEDNN_MAX_CPU_ISA=AVX512_CORE) ;;
    avx2_fma) cap=(ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2) ;;
    *) cap=() ;;
  esac
  echo "== tier $tier ${cap[*]:-} (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  env INFERD_ISA=$tier "${cap[@]}" PYTHONPATH=. "$PEER" benchmarks/embeddings_interleaved.py --model "$M" \
      --num-texts "$N" 2>&1 | grep -v "Loading weights"
done
