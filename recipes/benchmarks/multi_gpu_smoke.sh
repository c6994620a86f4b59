#!/usr/bin/env bash
# Multi-GPU smoke test of the trainer: stage 1 under torchrun on NPROC GPUs (default 2), once with
# the model replicated (--sharding ddp) and once sharded (--sharding fsdp), then a second sharded run
# stopped with SIGTERM part-way (as a preempted job would be) and resumed. A synthetic data set and a
# tiny tokenizer (one process) come first. Logs go to $OUT (at most 8 files), run folders to a new
# temporary folder; the output ends with a table of throughput, losses and peak GPU memory per rank,
# and how the resumed run compares with the uninterrupted one (also in $OUT/summary.txt). Small
# sizes: a few minutes in all, most of it compiling.
#
#   bash recipes/benchmarks/multi_gpu_smoke.sh                          # from the repository root
#   DEVICE=cpu STEPS=40 BATCH=4 bash recipes/benchmarks/multi_gpu_smoke.sh   # the same on the CPU (gloo)
set -uo pipefail
export PYTHONUNBUFFERED=1
# NVLink multicast (NVLS) must stay off on the lent multi-GPU machines
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/hmar_multi_gpu}
NPROC=${NPROC:-2}            # processes (GPUs)
STEPS=${STEPS:-80}           # stage-1 steps per run (metrics are logged every 10)
BATCH=${BATCH:-32}           # per process
STOP_AFTER=${STOP_AFTER:-20} # the interrupted run gets SIGTERM once it has logged this step
DEVICE=${DEVICE:-auto}       # auto: one GPU per process; cpu: gloo
PRECISION=${PRECISION:-auto} # auto: bf16 autocast on CUDA, float32 on the CPU
RUN_TIMEOUT=${RUN_TIMEOUT:-150}  # seconds per stage-1 run
mkdir -p "$OUT"
RUNS=$(mktemp -d /tmp/hmar_multi_gpu.XXXXXX)
echo "run folders in $RUNS, logs in $OUT"

# The device image has torch, Triton, typer, rich, ... but not this package: install it in place.
command -v hmar >/dev/null || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { echo "install failed:"; tail -5 "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"; } 2>&1 | tee "$OUT/env.txt"

fail() { echo "$1 failed (exit $2):"; grep -v Warning "$3" | tail -15; exit 1; }

echo "== data and tokenizer"
cat >"$RUNS/tokenizer.json" <<'EOF'
{"vocab_size": 512, "z_channels": 16, "ch": 32, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1, "patch_nums": [1, 2, 3, 4, 6, 8], "image_size": 64}
EOF
cat >"$RUNS/hmar.json" <<'EOF'
{"family": "hmar", "depth": 4, "branch_depth": 1, "width": 256, "num_heads": 4, "num_classes": 10}
EOF
hmar train data --out "$RUNS/data" --images-per-class 40 --size 64 --workers 4 >"$OUT/prepare.log" 2>&1 || fail data $? "$OUT/prepare.log"
hmar train tokenizer --data "$RUNS/data" --out "$RUNS/tok" --config "$RUNS/tokenizer.json" --steps 20 --batch-size 16 \
  --warmup-steps 5 --device "$DEVICE" --precision "$PRECISION" --workers 2 >>"$OUT/prepare.log" 2>&1 || fail tokenizer $? "$OUT/prepare.log"

# torchrun runs hmar through this wrapper, which leaves each rank's peak CUDA memory in <run>.memory.rank<R>.json
cat >"$RUNS/with_peak_memory.py" <<'EOF'
import json, os, sys
import torch
from hmar_cli.app import main
try:
    main()
finally:
    if torch.cuda.is_initialized():
        path = "%s.memory.rank%s.json" % (sys.argv[sys.argv.index("--out") + 1], os.environ.get("RANK", "0"))
        with open(path, "w") as f:
            json.dump({"allocated_gib": torch.cuda.max_memory_allocated() / 2**30, "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}, f)
EOF

stage1() {  # NAME SHARDING [MORE FLAGS]: sets CMD to the stage-1 command of run NAME
  local name=$1 sharding=$2; shift 2
  CMD=(python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$RUNS/with_peak_memory.py" train stage1
       --data "$RUNS/data" --out "$RUNS/$name" --tokenizer "$RUNS/tok/tokenizer" --model "$RUNS/hmar.json" --token-cache "$RUNS/tokens.pt"
       --steps "$STEPS" --batch-size "$BATCH" --warmup-steps 10 --checkpoint-every 1000 --device "$DEVICE" --precision "$PRECISION" --workers 2 --sharding "$sharding" "$@")
}

timed() {  # NAME: runs CMD, its output to $OUT/NAME.log, its wall time to NAME.seconds
  local start=$SECONDS
  timeout "$RUN_TIMEOUT" "${CMD[@]}" >"$OUT/$1.log" 2>&1; local rc=$?
  echo $((SECONDS - start)) >"$RUNS/$1.seconds"
  return $rc
}

for sharding in ddp fsdp; do
  echo "== stage 1, $NPROC processes, --sharding $sharding"
  stage1 "$sharding" "$sharding"
  timed "$sharding" || fail "$sharding" $? "$OUT/$sharding.log"
done

echo "== stage 1, --sharding fsdp, SIGTERM to torchrun once step $STOP_AFTER is logged, then --resume"
stage1 fsdp_resumed fsdp
start=$SECONDS
"${CMD[@]}" >"$OUT/fsdp_stopped.log" 2>&1 &
pid=$!
until grep -qs "\"step\": $STOP_AFTER," "$RUNS/fsdp_resumed/metrics.jsonl" || ! kill -0 $pid 2>/dev/null || ((SECONDS - start > RUN_TIMEOUT)); do
  sleep 0.05
done
kill -TERM $pid 2>/dev/null
wait $pid; rc=$?
stopped=$(grep -o "stopped by SIGTERM after step [0-9]*" "$OUT/fsdp_stopped.log" | head -1)
[ -n "$stopped" ] || fail "stopping the run with SIGTERM" $rc "$OUT/fsdp_stopped.log"
echo "$stopped"
stage1 fsdp_resumed fsdp --resume
timed fsdp_resumed || fail "resume" $? "$OUT/fsdp_resumed.log"

python3 - "$RUNS" "${stopped##* }" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

runs, resumed_at = Path(sys.argv[1]), int(sys.argv[2])


def records(name):
    return [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines() if line.strip()]


def memory(name):
    files = sorted(runs.glob(f"{name}.memory.rank*.json"))
    return " ".join(f"{json.loads(f.read_text())['allocated_gib']:.2f}" for f in files) or "-"


def gap(a, b):
    return max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b))


print(f"\n{'run':<14}{'from':>6}{'to':>6}{'wall s':>8}{'img/s':>10}{'loss':>9}{'grad norm':>10}  peak GiB per rank")
for name, first in (("ddp", 0), ("fsdp", 0), ("fsdp_resumed", resumed_at)):
    rows = [r for r in records(name) if r["step"] > first]
    steady = [r["images_per_s"] for r in rows[1:]] or [rows[-1]["images_per_s"]]  # the first window holds the compiling
    wall = (runs / f"{name}.seconds").read_text().strip()
    print(f"{name:<14}{first:>6}{rows[-1]['step']:>6}{wall:>8}{sum(steady) / len(steady):>10.1f}{rows[-1]['loss']:>9.4f}"
          f"{rows[-1].get('grad_norm', float('nan')):>10.4f}  {memory(name)}")

ddp, fsdp, resumed = (records(n) for n in ("ddp", "fsdp", "fsdp_resumed"))
print(f"\nfsdp vs ddp: largest relative loss difference over the logged steps {gap(fsdp, ddp):.2e} "
      "(more under bf16: fsdp then gathers the blocks' weights in bf16)")
steps_match = [r["step"] for r in resumed] == [r["step"] for r in fsdp]
print(f"fsdp resumed from step {resumed_at} vs uninterrupted: logged steps {'match' if steps_match else 'DIFFER'}, "
      f"largest relative loss difference {gap(resumed, fsdp):.2e} (0 where the GPU kernels are deterministic)")
EOF
