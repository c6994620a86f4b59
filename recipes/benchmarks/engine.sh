#!/usr/bin/env bash
# The engine benchmarks of BENCHMARKS.md in one go on a CUDA machine: GPU engine tests, then
# `hmar bench sample` (batch 64 and 1) and `hmar bench train` (256 px batch 32, 512 px batch 16),
# each HMAR vs VAR in one run, with torch.profiler breakdowns. Logs, JSON and profiles go to $OUT.
#
#   bash recipes/benchmarks/engine.sh                 # everything
#   TASKS="sample train256" bash recipes/benchmarks/engine.sh    (tasks: tests sample sample-nograph sample-compiled train256 train512
#                                                                     train256-graph train256-autotune levers decoders)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/hmar_bench}; mkdir -p "$OUT/profiles"
TASKS=${TASKS:-"tests sample train256 train512"}

# The device image has torch, Triton, typer, rich, ... but not this package: install it in place.
command -v hmar >/dev/null || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { echo "install failed:"; tail -5 "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.txt"

bench() {  # NAME ARGS...: one bench command, its table to the log, its JSON to NAME.json
  local name=$1; shift
  echo "== $name: hmar bench $*"
  timeout "${BENCH_TIMEOUT:-420}" hmar bench "$@" --json --overwrite >"$OUT/$name.json" 2>"$OUT/$name.err" \
    || { echo "$name failed:"; tail -5 "$OUT/$name.err"; return; }
  python3 - "$OUT/$name.json" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
for r in data["rows"]:
    print(f"  {r['family']:>5} {r['task']:>6} {r['median_ms']:9.1f} ms {r['images_per_s']:8.1f} img/s "
          f"peak {r['peak_memory_gib'] or 0:6.2f} GiB  TF/s {r['tflops'] or 0:6.1f}  vs VAR {r['ratio_vs_var']:.2f}x"
          + ("  compiled" if r.get("compiled") else ""))
    for name, c in ((r.get("profile") or {}).get("categories") or {}).items():
        print(f"        {name:<22} {c['ms']:8.2f} ms {c['percent']:5.1f} %")
EOF
}

for task in $TASKS; do
  case $task in
    tests) timeout 420 python3 -m pytest -m gpu tests/test_pipeline.py tests/test_gpu_engine.py tests/test_compile.py tests/test_inference.py \
             tests/test_cuda_graph.py tests/test_benchmark.py tests/test_tokenizer.py tests/test_conformance.py \
             tests/test_channels_last_kernels.py tests/test_kernels.py tests/test_cosine_qkv.py tests/test_adaln.py tests/test_fused_blocks.py -q -p no:cacheprovider -rfE \
             2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -15 ;;
    sample) bench sample64 sample --batch-size 64 --steps 14 --no-compile --profile "$OUT/profiles"
            bench sample1 sample --batch-size 1 --steps 14 --iters 10 --no-compile ;;
    sample-nograph) bench sample64ng sample --batch-size 64 --steps 14 --no-compile --no-cuda-graph
            bench sample1ng sample --batch-size 1 --steps 14 --iters 10 --no-compile --no-cuda-graph ;;
    sample-compiled) bench sample64c sample --batch-size 64 --steps 14 --compile
            bench sample1c sample --batch-size 1 --steps 14 --iters 10 --compile ;;
    train256) bench train256 train --resolution 256 --batch-size 32 --profile "$OUT/profiles" ;;
    train512) bench train512 train --resolution 512 --batch-size 16 --no-cuda-graph ;;
    train256-graph) bench train256g train --resolution 256 --batch-size 32 --cuda-graph --profile "$OUT/profiles" ;;
    train256-autotune) BENCH_TIMEOUT=${BENCH_TIMEOUT:-560} bench train256a train --resolution 256 --batch-size 32 --compile-mode max-autotune-no-cudagraphs ;;
    decoders) timeout 400 python3 recipes/benchmarks/sampling_levers.py --decoders --json "$OUT/decoders.json" 2>&1 | tee "$OUT/decoders.log" | grep -v Warning ;;
    levers) timeout 480 python3 recipes/benchmarks/sampling_levers.py --json "$OUT/levers.json" 2>&1 | tee "$OUT/levers.log" | grep -v Warning ;;
    *) echo "unknown task $task" ;;
  esac
done
# one archive of everything (the device returns at most 8 files), the console log beside it
(cd "$OUT" && tar -czf results.tgz --exclude=results.tgz --exclude=run.log ./* && find . -mindepth 1 ! -name results.tgz ! -name run.log -delete)
