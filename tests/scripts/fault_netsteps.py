"""Rank script: time sharded SGD steps of a model with about P float32 parameters.

    fault_netsteps.py P [P ...] [--steps K]

For each size, rank 0 prints ``params P bytes_per_step B median_step_s T``: B is the
bytes this rank sent per step (reduce-scatter + all-gather, counted by distopt) and
T the median wall time of K evaluated steps after one warm-up step.
"""

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

import distopt


def time_steps(group, params, steps):
    width = max(1, int(params**0.5))
    model = nn.Linear(width, width, bias=False)
    opt = distopt.SGD(learning_rate=1e-3)
    x = mx.ones((4, width))

    def loss_fn(model):
        return model(x).sum()

    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        _, grads = nn.value_and_grad(model, loss_fn)(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        times.append(time.perf_counter() - start)
    sent = opt.comm.traffic.total_sent() // (steps + 1)
    return width * width, sent, statistics.median(times[1:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("params", type=int, nargs="+")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    group = distopt.init()
    for params in args.params:
        n, sent, median = time_steps(group, params, args.steps)
        if group.rank() == 0:
            print(f"params {n} bytes_per_step {sent} median_step_s {median:.4f}", flush=True)


if __name__ == "__main__":
    main()
