#!/usr/bin/env bash
# The tcp ring's schedules side by side on a many-core host (the lent GPU machine's 16
# CPU cores): DISTOPT_TCP_WAYS=0 (step by step, one way), 1 (streamed one way), 2
# (streamed both ways), 2 and 4 ranks, MLX's cache at 8 GiB as the optimizer sets it.
# On the GPU machine: `source .gpu-b/setup.sh && bash benchmarks/tcp_ways_gpu_host.sh [ARGS]`.
set -u
export PYTHONUNBUFFERED=1
nproc; python3 -c "import mlx.core as mx; print(mx.__version__, mx.default_device())"
run() { echo "== $*"; timeout 120 python3 -m distopt.cli launch "$@" 2>&1 | grep -v "alive:"; }
for n in 2 4; do
  for ways in 0 1 2; do
    run -n $n --backend ring --env DISTOPT_TCP_WAYS=$ways benchmarks/bench_comm.py --cpu --reps 11 --mlx-cache-gb 8 "$@"
  done
  run -n $n --backend ring --env DISTOPT_TCP_WAYS=2 --env DISTOPT_TCP_CHUNK_KIB=4096 benchmarks/bench_comm.py --cpu --reps 11 --mlx-cache-gb 8 "$@"
done
