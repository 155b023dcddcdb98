#!/usr/bin/env bash
# benchmarks/bench_comm.py on a many-core host's CPU (the lent GPU machine: 16 cores, so 4
# ranks do not share cores as on the 2-core VM): ring (tcp) and MPI (system Open MPI),
# 2 and 4 ranks, 4-256 MiB; extra arguments go to bench_comm.py (e.g. --mlx-cache-gb 8). On the GPU machine:
# `source .gpu-b/setup.sh && bash benchmarks/comm_gpu_host.sh [ARGS]`.
RUN_TIMEOUT=200
source "$(dirname "$0")/host_preamble.sh"
echo "MLX_MPI_LIBNAME=${MLX_MPI_LIBNAME:-unset}"; mpirun --version 2>&1 | head -1
for n in 2 4; do
  run -n $n --backend ring benchmarks/bench_comm.py --cpu --reps 15 "$@"
  run -n $n --backend mpi benchmarks/bench_comm.py --cpu --reps 15 "$@"
done
