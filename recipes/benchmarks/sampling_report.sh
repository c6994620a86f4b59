#!/usr/bin/env bash
# The sampling section of BENCHMARKS.md in one device call: the GPU tests of the decoder's kernels
# and of graphed sampling, the decoder's variants timed in interleaved rounds (recipes/benchmarks/
# decoder.py), and `hmar bench sample` HMAR vs VAR at d16 256 px (batch 64 and 1, both profiled),
# d16 512 px (batch 16) and d30 256 px (batch 64). Logs, JSON, profiles and report.md (the tables)
# go to $OUT, packed as results.tgz beside report.md and run.log.
#
#   bash recipes/benchmarks/sampling_report.sh
#   TASKS="decoder sizes" bash recipes/benchmarks/sampling_report.sh     (tasks: tests decoder sizes)
# Every step's time limit is cut to what is left of BUDGET_S (default 540 s) so that the report and
# the archive are written inside a 10-minute device call; a step with under 30 s left is skipped.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/hmar_sampling_report}; mkdir -p "$OUT/profiles"
TASKS=${TASKS-"tests decoder sizes"}  # TASKS="" runs none (the report of what $OUT holds)
DECODER_VARIANTS=${DECODER_VARIANTS:-"both (default)|before: separate bias, interpolate|both, fast divisions|before, eager|both, eager|both, eager, direct launch|both, eager, fast divisions, direct launch|NCHW (PyTorch's modules), eager"}

# The conformance fixtures (../shared/conformance beside a checkout) travel as a carried copy.
[ -d .conformance ] && export HMAR_CONFORMANCE_DIR=$PWD/.conformance
command -v hmar >/dev/null || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { echo "install failed:"; tail -5 "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuDNN', torch.backends.cudnn.version())"
  nproc; } 2>&1 | tee "$OUT/env.txt"

BUDGET_S=${BUDGET_S:-540}
limit() {  # WANTED: seconds for the next step, at most what the budget has left (0: skip it)
  local left=$((BUDGET_S - SECONDS - 15))
  if [ "$left" -lt 30 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

bench() {  # NAME ARGS...: one `hmar bench sample`, its JSON to NAME.json
  local name=$1; shift
  local t0=$SECONDS s; s=$(limit 200)
  [ "$s" -gt 0 ] || { echo "== $name skipped: out of time"; return; }
  echo "== $name: hmar bench sample $*"
  timeout "$s" hmar bench sample "$@" --no-compile --json --overwrite >"$OUT/$name.json" 2>"$OUT/$name.err" \
    || { echo "$name failed:"; tail -5 "$OUT/$name.err"; return; }
  echo "   $((SECONDS - t0)) s"
}

for task in $TASKS; do
  case $task in
    tests) s=$(limit 150); [ "$s" -gt 0 ] || continue
           timeout "$s" python3 -m pytest -m gpu tests/test_channels_last_kernels.py tests/test_inference.py tests/test_cuda_graph.py \
             tests/test_launch.py -q -p no:cacheprovider -rfEs 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error|SKIP" | tail -15 ;;
    decoder) IFS='|' read -ra variants <<<"$DECODER_VARIANTS"
             s=$(limit 150); [ "$s" -gt 0 ] || continue
             timeout "$s" python3 recipes/benchmarks/decoder.py --rounds "${ROUNDS:-15}" --variants "${variants[@]}" \
               --profile "both (default)" "both, eager" --json "$OUT/decoder.json" 2>&1 | tee "$OUT/decoder.log" | grep -v Warning ;;
    sizes) bench d16_b64 --batch-size 64 --profile "$OUT/profiles/b64"
           bench d16_b1 --batch-size 1 --iters 10 --profile "$OUT/profiles/b1"
           bench d16_512_b16 --resolution 512 --batch-size 16
           bench d30_b64 --depth 30 --batch-size 64 ;;
    *) echo "unknown task $task" ;;
  esac
done

python3 - "$OUT" <<'EOF' | tee "$OUT/report.md"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("## hmar bench sample: HMAR vs VAR (random weights at the published shape, cfg 1.5, top-k 900, top-p 0.96, "
      "HMAR 14 steps, CUDA graphs, blocks not compiled)\n")
rows = [("d16", "256", "64", "d16_b64"), ("d16", "256", "1", "d16_b1"), ("d16", "512", "16", "d16_512_b16"), ("d30", "256", "64", "d30_b64")]
print("| model | px | batch | HMAR ms | HMAR ms/image | HMAR peak GiB | VAR ms | VAR peak GiB | HMAR speed vs VAR |\n|---|---|---|---|---|---|---|---|---|")
environment = None
for model, px, batch, name in rows:
    path = out / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"| {model} | {px} | {batch} | (no result: see {name}.err) |||||")
        continue
    environment = data["environment"]
    r = {row["family"]: row for row in data["rows"]}
    h, v = r["hmar"], r["var"]
    print(f"| {model} | {px} | {batch} | {h['median_ms']:.1f} | {h['median_ms'] / int(batch):.2f} | {h['peak_memory_gib']:.2f} | "
          f"{v['median_ms']:.1f} | {v['peak_memory_gib']:.2f} | {h['ratio_vs_var']:.2f}x |")
env_file = out / "env.txt"
print("\n" + (env_file.read_text().strip().replace("\n", "; ") if env_file.exists() else str(environment)) + "\n")
for batch in ("b64", "b1"):
    profiles = {}
    for family in ("hmar", "var"):
        path = out / "profiles" / batch / f"sample_{family}.json"
        if path.exists():
            profiles[family] = json.loads(path.read_text())
    if not profiles:
        continue
    print(f"### where the time goes, d16 256 px {batch} (GPU kernel ms per batch)\n")
    names = list(next(iter(profiles.values()))["categories"])
    print("| category | " + " | ".join(f.upper() for f in profiles) + " |\n|---|" + "---|" * len(profiles))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{p['categories'][n]['ms']:.2f}" for p in profiles.values()) + " |")
    print("| kernel total | " + " | ".join(f"{p['total_ms']:.2f}" for p in profiles.values()) + " |")
    print("| median batch (timed) | " + " | ".join(f"{p['median_ms']:.2f}" for p in profiles.values()) + " |\n")
EOF
# one archive of everything (the device returns at most 8 files), the report and console log beside it
(cd "$OUT" && tar -czf results.tgz --exclude=results.tgz --exclude=run.log --exclude=report.md ./* \
   && find . -mindepth 1 ! -name results.tgz ! -name run.log ! -name report.md -delete)
