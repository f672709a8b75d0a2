#!/usr/bin/env bash
# The prepared GPU check, for a lent GPU machine (it has PyTorch, no network): installs carried wheels
# (.whl/, see docs/benchmarks.md), runs the whole test suite on CUDA (the engine's device default is `auto`),
# the CUDA throughput benchmark on a SmolLM2-shaped model with random weights (.gpu/smollm2-shape, made by
# benchmarks/random_model.py) and the CUDA-graph probe. Logs go to $OUT (default: gpu-out/).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD INFERD_HOME=/tmp/inferd-home PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
MODEL=.gpu/smollm2-shape
[ -f $MODEL/model.safetensors ] || python3 benchmarks/random_model.py $MODEL
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -n 4 tests/ 2>&1 | tee "$OUT/pytest.log" | tail -40
B="python3 benchmarks/throughput.py --model $MODEL --device cuda --dtype bfloat16 --concurrency 1 16 64 --reps ${REPS:-1}"
timeout ${BENCH_TIMEOUT:-100} $B --quantization none int8 int4 --json "$OUT/throughput_cuda.json" 2>&1 | tee "$OUT/throughput.log"
timeout ${BENCH_TIMEOUT:-100} $B --quantization none int4 --enforce-eager --json "$OUT/throughput_cuda_eager.json" 2>&1 \
  | tee "$OUT/throughput_eager.log"
[ "${PROBE:-1}" = 0 ] || timeout ${PROBE_TIMEOUT:-80} python3 benchmarks/cuda_graphs_probe.py --model $MODEL \
  --quantization none int4 2>&1 | tee "$OUT/probe.log"
