#!/usr/bin/env bash
# Every GPU measurement of issues 3 and 8, in one call on the 2-GPU machine (nvidia-h200-x2),
# after `source .gpu-b/setup.sh` (../shared/gpu/README.md). Results go to $OUT:
#   env.txt          date, GPUs, PyTorch
#   nccl.log         benchmarks/gpu_nccl.py on 2 GPUs: parity + 256 MiB reduce-scatter/all-gather vs all_sum
#   nccl_rank*.json  the same, per rank
#   grad_layout.txt  benchmarks/grad_layout_probe.py: flattening a Linear weight gradient vs a plain copy
#   bench_gpu.*      distopt bench --device gpu --backend nccl (table, JSON, chart)
set -uo pipefail
OUT=${OUT:-/tmp/distopt-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
SIZES=${SIZES:-100M,1B}
{ date -u; nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count())"; } 2>&1 | tee "$OUT/env.txt"

port=$((29500 + RANDOM % 1000))
for r in 0 1; do
  NCCL_HOST_IP=127.0.0.1 NCCL_PORT=$port MLX_WORLD_SIZE=2 MLX_RANK=$r CUDA_VISIBLE_DEVICES=$r \
    timeout ${NCCL_TIMEOUT:-150} python3 benchmarks/gpu_nccl.py --out "$OUT/nccl_rank$r.json" > "$OUT/nccl_rank$r.log" 2>&1 &
done
wait
cat "$OUT/nccl_rank0.log" "$OUT/nccl_rank1.log" > "$OUT/nccl.log"; rm -f "$OUT"/nccl_rank?.log
tail -c 3000 "$OUT/nccl.log"

CUDA_VISIBLE_DEVICES=0 python3 benchmarks/grad_layout_probe.py --dims 8192 2>&1 | tee "$OUT/grad_layout.txt"

[ -n "${NCCL_ONLY:-}" ] && exit 0
timeout ${BENCH_TIMEOUT:-400} python3 -m distopt.bench --device gpu --backend nccl --ranks 2 --sizes "$SIZES" \
  --max-params "" --throughput 64M --repeats 10 --warmup 3 --timeout 170 \
  --json "$OUT/bench_gpu.json" --plot "$OUT/bench_gpu.png" 2>&1 | tee "$OUT/bench_gpu.txt"
