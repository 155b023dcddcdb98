#!/usr/bin/env bash
# benchmarks/overlap_probe.py on a many-core host's CPU (the lent GPU machine: 16 cores), ring backend over
# loopback, 2 and 4 ranks. On the GPU machine: `source .gpu-b/setup.sh && bash benchmarks/overlap_gpu_host.sh`.
RUN_TIMEOUT=280
source "$(dirname "$0")/host_preamble.sh"
run -n 2 benchmarks/overlap_probe.py --cpu --params 1e7 --bucket-mb 4 --repeats 11
run -n 2 benchmarks/overlap_probe.py --cpu --model transformer --params 1e7 --bucket-mb 4 --repeats 11
run -n 4 benchmarks/overlap_probe.py --cpu --params 1e7 --bucket-mb 4 --repeats 11
