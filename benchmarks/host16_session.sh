#!/usr/bin/env bash
# One call on the lent GPU machine's 16 CPU cores (after `source .gpu-b/setup.sh`): the tcp
# ring's schedules (tcp_ways_gpu_host.sh), bench_comm on ring and MPI with MLX's cache raised
# as the optimizer raises it (comm_gpu_host.sh --mlx-cache-gb 8), and the kept ring scratch
# against fresh (scratch_probe.py, 4 ranks). Output to $OUT (default /tmp/distopt-host16).
set -u
OUT=${OUT:-/tmp/distopt-host16}
mkdir -p "$OUT"
here=$(dirname "$0")
date -u; git log --oneline -1 2>/dev/null
bash "$here/tcp_ways_gpu_host.sh" 2>&1 | tee "$OUT/tcp_ways.txt"
bash "$here/comm_gpu_host.sh" --mlx-cache-gb 8 2>&1 | tee "$OUT/comm_cache8.txt"
RUN_TIMEOUT=120
source "$here/host_preamble.sh"
for b in mpi ring; do run -n 4 --backend $b benchmarks/scratch_probe.py --cpu; done 2>&1 | tee "$OUT/scratch_probe.txt"
date -u
