#!/usr/bin/env bash
# The CPU side-by-side runs of issue 8 on an idle many-core host (the GPU machine's CPUs),
# after `source .gpu-b/setup.sh`; results to $OUT. Also the update throughput on its GPU.
set -uo pipefail
OUT=${OUT:-/tmp/distopt-cpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
date -u; nproc; nvidia-smi -L
timeout 200 python3 -m distopt.bench --device cpu --ranks 2,4 --sizes 1M,10M \
  --json "$OUT/cpu_small.json" > "$OUT/cpu_small.txt" 2>&1
timeout 170 python3 -m distopt.bench --device cpu --ranks 2 --sizes 100M --lm-max 100M --throughput 0 \
  --json "$OUT/cpu_100m.json" > "$OUT/cpu_100m.txt" 2>&1
timeout 120 python3 -m distopt.bench --device cpu --models mlp --sizes 10M --ranks 2,4,8 --max-params "" \
  --throughput 0 --json "$OUT/cpu_scaling.json" > "$OUT/cpu_scaling.txt" 2>&1
timeout 60 python3 -m distopt.bench --device gpu --models mlp --sizes 10M --methods single --throughput 64M \
  --json "$OUT/gpu_throughput.json" 2>&1 | tail -n 8
tail -n 25 "$OUT"/*.txt
