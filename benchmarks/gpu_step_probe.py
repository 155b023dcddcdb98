"""Where a distopt step's time and memory go on GPUs: one variant per launch.

Run on every rank (NCCL, one GPU each), e.g. on the 2-GPU machine::

    MLX_RANK=r CUDA_VISIBLE_DEVICES=r ... python3 benchmarks/gpu_step_probe.py --variant s1 --bucket-mb 64

A square MLP of ``--params`` parameters (4 layers, fp32, batch 256), Adamax. Times the
optimizer part alone (gradients evaluated first): ``opt.update`` + ``mx.eval`` of the new
parameters and state, median of ``--steps``; prints it with MLX's peak memory of the
step. Variants: ``mlx_dp`` (``average_gradients`` + ``mlx.optimizers.Adamax``),
``s1``/``s2`` (distopt stage 1 / 2), ``s1_lazy`` (stage 1 without scheduling buckets
early: one graph), ``s1_compiled`` (stage 1, the update compiled with ``mx.compile``);
``s1_wK`` allows K buckets in flight at stage 1; ``once`` / ``noprefetch`` in the name drop the scheduling after each reduction / of each
flat bucket before its collective.
"""

import argparse
import json
import math
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

import distopt
from distopt import comm as distopt_comm
from distopt import sharded as distopt_sharded


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="s1")
    p.add_argument("--params", type=float, default=1e9)
    p.add_argument("--bucket-mb", type=float, default=64)
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    group = distopt.init()
    width = int(math.sqrt(a.params / 4))
    mx.random.seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(4)])
    if a.variant == "mlx_dp":
        opt = optim.Adamax(1e-4)
    else:
        stage = 2 if a.variant == "s2" else 1
        opt = distopt.Adamax(1e-4, stage=stage, bucket_bytes=int(a.bucket_mb * 2**20))
        if a.variant == "s1_lazy":
            opt._settle = lambda arrays: None
        if "_w" in a.variant:  # s1_wK: at most K buckets in flight at stage 1
            distopt_sharded.IN_FLIGHT = int(a.variant.split("_w")[1])
        if "once" in a.variant:  # schedule each bucket once, after its gather (not after its reduction)
            settle = opt._settle
            opt._settle = lambda arrays: settle(arrays) if isinstance(arrays, list) else None
        if "noprefetch" in a.variant:  # the communicator does not schedule each flat bucket first
            check = distopt_comm.traced
            distopt_comm.traced = lambda x, wait=True: False if not wait else check(x)
    opt.init(model.trainable_parameters())
    x = mx.random.normal((256, width))
    loss_and_grad = nn.value_and_grad(model, lambda m: m(x).square().mean())

    def update(grads):
        if a.variant == "mlx_dp":
            grads = nn.average_gradients(grads)
        opt.update(model, grads)

    if a.variant == "s1_compiled":
        state = [model.state, opt.state]
        update = mx.compile(update, inputs=state, outputs=state)
    times, peaks = [], []
    for _ in range(a.steps + 2):
        loss, grads = loss_and_grad(model)
        mx.eval(loss, grads, model.parameters(), opt.state)
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        update(grads)
        mx.eval(model.parameters(), opt.state)
        mx.synchronize()
        times.append(time.perf_counter() - start)
        peaks.append(mx.get_peak_memory())
        del loss, grads
    times, peaks = times[2:], peaks[2:]
    if group.rank() == 0:
        print("PROBE " + json.dumps({
            "variant": a.variant, "bucket_mb": a.bucket_mb, "params": 4 * width * width, "ranks": group.size(),
            "opt_ms": 1e3 * sorted(times)[len(times) // 2], "min_ms": 1e3 * min(times),
            "peak_gib": max(peaks) / 2**30, "model_gib": 4 * 4 * width * width / 2**30,
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
