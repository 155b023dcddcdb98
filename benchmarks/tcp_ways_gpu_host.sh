#!/usr/bin/env bash
# The tcp ring's schedules side by side on a many-core host (the lent GPU machine's 16
# CPU cores): DISTOPT_TCP_WAYS=0 (step by step, one way), 1 (streamed one way), 2
# (streamed both ways), 2 and 4 ranks, MLX's cache at 8 GiB as the optimizer sets it.
# On the GPU machine: `source .gpu-b/setup.sh && bash benchmarks/tcp_ways_gpu_host.sh [ARGS]`.
RUN_TIMEOUT=120
source "$(dirname "$0")/host_preamble.sh"
for n in 2 4; do
  for ways in 0 1 2; do
    run -n $n --backend ring --env DISTOPT_TCP_WAYS=$ways benchmarks/bench_comm.py --cpu --reps 11 --mlx-cache-gb 8 "$@"
  done
  run -n $n --backend ring --env DISTOPT_TCP_WAYS=2 --env DISTOPT_TCP_CHUNK_KIB=4096 benchmarks/bench_comm.py --cpu --reps 11 --mlx-cache-gb 8 "$@"
done
