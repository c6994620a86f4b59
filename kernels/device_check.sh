#!/bin/bash
# One device call: GPU tests of the attention kernel, then the benchmark at 256/512/1024 px for both
# patterns (ours + every baseline in the same run). Logs and JSON land in $OUT. The tests include the
# torch.compile (Inductor) ones, minutes of compilation: TEST_TIMEOUT (s) bounds them.
set -o pipefail
export PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
OUT=${OUT:-/tmp/hmar_out}; mkdir -p "$OUT"
# hmar.kernels and hmar.train live in kernels/ and train/ (installed namespaced): install the checkout.
command -v hmar >/dev/null || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { echo "install failed: see install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout ${TEST_TIMEOUT:-420} python3 -m pytest tests/test_kernels.py -m gpu -q -rA -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error|rel\. err|px " | head -80
fi
timeout ${BENCH_TIMEOUT:-400} python3 -m hmar.kernels.bench --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^  "
