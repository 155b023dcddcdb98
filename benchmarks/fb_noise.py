"""How much one process's forward+backward varies from step to step on this machine.

The same model, the same batch, one process, no distribution: every step is the same
computation, so its spread is the machine's own noise (CPU frequency, neighbours on a
VM). It bounds what a step-time ratio between two methods can resolve when their
difference lies in the optimizer step only:

    python benchmarks/fb_noise.py --model transformer --params 1e6 --steps 15
    python benchmarks/fb_noise.py --model mlp --params 1e7 --cache-gb 1

Prints the median, min and max of ``value_and_grad`` + ``mx.eval`` (ms) and the CPU
time over wall time (1.0: one thread).
"""

import argparse
import os
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

from distopt.bench import DEFAULT_SHAPES
from distopt.bench.models import mlx_model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="transformer", choices=("mlp", "transformer"))
    p.add_argument("--params", type=float, default=1e6)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--cache-gb", type=float, default=None, help="mx.set_cache_limit, in GiB")
    args = p.parse_args()
    mx.set_default_device(mx.cpu)
    if args.cache_gb is not None:
        mx.set_cache_limit(int(args.cache_gb * 2**30))
    cfg = {"rank": 0, **DEFAULT_SHAPES["cpu"]}  # distopt bench's CPU shapes
    model, loss_fn, (x, y) = mlx_model(args.model, int(args.params), cfg)
    grad_fn = nn.value_and_grad(model, loss_fn)
    times, cpu0 = [], os.times()
    for _ in range(args.steps):
        start = time.perf_counter()
        loss, grads = grad_fn(model, x, y)
        mx.eval(loss, grads)
        times.append(time.perf_counter() - start)
    cpu1 = os.times()
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / sum(times)
    ms = [1e3 * t for t in times]
    print(f"{args.model} {args.params:g}: fb median {statistics.median(ms):.1f} ms, min {min(ms):.1f}, max {max(ms):.1f}, cpu/wall {cpu:.2f}")


if __name__ == "__main__":
    main()
