#!/usr/bin/env bash
# Runs benchmarks/gpu_step_probe.py for each variant on the 2-GPU machine; prints PROBE lines.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 NCCL_HOST_IP=127.0.0.1 MLX_WORLD_SIZE=2
PARAMS=${PARAMS:-1e9}
MODEL=${MODEL:-square}
VARIANTS=${VARIANTS:-"mlx_dp:64 s1:64 s1_lazy:64 s2:64 s1:256 s1:1024 s1_compiled:64"}
for spec in $VARIANTS; do
  variant=${spec%%:*}; mb=${spec##*:}
  export NCCL_PORT=$((29500 + RANDOM % 1000))
  for r in 0 1; do
    MLX_RANK=$r CUDA_VISIBLE_DEVICES=$r timeout 120 python3 benchmarks/gpu_step_probe.py \
      --variant "$variant" --bucket-mb "$mb" --params "$PARAMS" --model "$MODEL" > /tmp/probe_$r.log 2>&1 &
  done
  wait
  case $variant in
    *_prof*) grep -v "^\s*$" /tmp/probe_0.log | grep -v NCCL | tail -32 ;;
    *) grep PROBE /tmp/probe_0.log || tail -5 /tmp/probe_0.log /tmp/probe_1.log ;;
  esac
done
