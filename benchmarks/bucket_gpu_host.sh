#!/usr/bin/env bash
# Which bucket size for the eager paths: benchmarks/overlap_probe.py (its `default` variant
# has distopt's default 256 MiB buckets) on a many-core host's CPU (the lent GPU machine: 16
# cores), ring backend over loopback. On the GPU machine:
# `source .gpu-b/setup.sh && bash benchmarks/bucket_gpu_host.sh`.
set -u
export PYTHONUNBUFFERED=1
nproc; python3 -c "import mlx.core as mx; print(mx.__version__, mx.default_device())"
run() { echo "== $*"; timeout 150 python3 -m distopt.cli launch "$@" 2>&1 | grep -v "alive:\|OVERLAP"; }
for mb in 4 16 64; do
  run -n 2 benchmarks/overlap_probe.py --cpu --params 2e7 --bucket-mb $mb --repeats 9
done
run -n 4 benchmarks/overlap_probe.py --cpu --params 2e7 --bucket-mb 16 --repeats 9
