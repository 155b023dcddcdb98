#!/usr/bin/env bash
# Which bucket size for the eager paths: benchmarks/overlap_probe.py (its `default` variant
# has distopt's default 256 MiB buckets) on a many-core host's CPU (the lent GPU machine: 16
# cores), ring backend over loopback. On the GPU machine:
# `source .gpu-b/setup.sh && bash benchmarks/bucket_gpu_host.sh`.
RUN_TIMEOUT=150
source "$(dirname "$0")/host_preamble.sh"
for mb in 4 16 64; do
  run -n 2 benchmarks/overlap_probe.py --cpu --params 2e7 --bucket-mb $mb --repeats 9
done
run -n 4 benchmarks/overlap_probe.py --cpu --params 2e7 --bucket-mb 16 --repeats 9
