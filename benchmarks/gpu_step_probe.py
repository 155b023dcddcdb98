"""Where a distopt step's time and memory go on GPUs: one variant per launch.

Run on every rank (NCCL, one GPU each), e.g. on the 2-GPU machine::

    MLX_RANK=r CUDA_VISIBLE_DEVICES=r ... python3 benchmarks/gpu_step_probe.py --variant s1 --bucket-mb 64

A square MLP of ``--params`` parameters (4 layers, fp32, batch 256; or ``--model mlp|transformer``,
the models of ``distopt bench``), Adamax. Times the
optimizer part alone (gradients evaluated first): ``opt.update`` + ``mx.eval`` of the new
parameters and state, median of ``--steps``; prints it with MLX's peak memory of the
step, and ``host_ms``: how long ``opt.update`` took to return (graph building, waits). Variants: ``mlx_dp`` (``average_gradients`` + ``mlx.optimizers.Adamax``),
``s1``/``s2`` (distopt stage 1 / 2), ``s1_lazy`` (stage 1 without scheduling buckets
early: one graph), ``s1_compiled`` (stage 1, the update compiled with ``mx.compile``);
``s1_wK`` allows K buckets in flight at stage 1; ``once`` / ``noprefetch`` in the name drop the scheduling after each reduction / of each
flat bucket before its collective; ``_keep`` keeps MLX's buffer cache between steps (otherwise cleared before each timed step);
``_cache`` raises MLX's cache limit to 8 GiB (on Linux CPU it is 32 MiB); ``_peroutput`` runs
the update as one compiled kernel per output, as distopt does on the CPU (the GPU default
is one fused kernel).
"""

import argparse
import json
import math
import re
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

import distopt
from distopt import comm as distopt_comm
from distopt import sharded as distopt_sharded


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="s1")
    p.add_argument("--params", type=float, default=1e9)
    p.add_argument("--bucket-mb", type=float, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=256, help="rows per rank (distopt bench uses 16 on CPU)")
    p.add_argument("--model", default="square", help="square (4-layer MLP) or a distopt bench model: mlp, transformer")
    a = p.parse_args()
    group = distopt.init()
    if "_cache" in a.variant:  # _cache: MLX keeps up to 8 GiB of freed buffers (a Mac's default is its memory limit)
        mx.set_cache_limit(8 << 30)
    width = int(math.sqrt(a.params / 4))
    mx.random.seed(0)
    if a.model == "square":
        model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(4)])
        x = mx.random.normal((a.batch, width))
        loss_and_grad = nn.value_and_grad(model, lambda m: m(x).square().mean())
    else:
        from distopt.bench.models import mlx_model

        cfg = {"rank": group.rank(), "batch": a.batch, "lm_batch": 8, "seq": 256}
        model, loss_fn, (x, y) = mlx_model(a.model, int(a.params), cfg)
        loss_and_grad = lambda m: nn.value_and_grad(m, loss_fn)(m, x, y)  # noqa: E731
    if a.variant.startswith("mlx_dp"):
        opt = optim.Adamax(1e-4)
    else:
        stage = 2 if a.variant == "s2" else 1
        opt = distopt.Adamax(1e-4, stage=stage, bucket_bytes=int(a.bucket_mb * 2**20))
        if "lazy" in a.variant:
            opt._settle = lambda arrays: None
        window = re.search(r"_w(\d+)", a.variant)
        if window:  # s1_wK: at most K buckets in flight at stage 1
            distopt_sharded.IN_FLIGHT = int(window.group(1))
        if "once" in a.variant:  # schedule each bucket once, after its gather (not after its reduction)
            settle = opt._settle
            opt._settle = lambda arrays: settle(arrays) if isinstance(arrays, list) else None
        if "peroutput" in a.variant:  # the CPU's kernel per output, on any device
            opt._kernel = opt._update_per_output
        if "noprefetch" in a.variant:  # the communicator does not schedule each flat bucket first
            check = distopt_comm.traced
            distopt_comm.traced = lambda x, wait=True: False if not wait else check(x)
    opt.init(model.trainable_parameters())

    def update(grads):
        if a.variant.startswith("mlx_dp"):
            grads = nn.average_gradients(grads)
        opt.update(model, grads)

    if a.variant == "s1_compiled":
        state = [model.state, opt.state]
        update = mx.compile(update, inputs=state, outputs=state)
    profile = None
    if "_prof" in a.variant:  # s1_prof: cProfile of the update calls, rank 0 prints the top entries
        import cProfile

        profile = cProfile.Profile()
    times, hosts, peaks = [], [], []
    for _ in range(a.steps + 2):
        loss, grads = loss_and_grad(model)
        mx.eval(loss, grads, model.parameters(), opt.state)
        mx.synchronize()
        if "_keep" not in a.variant:  # _keep: keep MLX's buffer cache between steps, as training does
            mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(mx.distributed.all_sum(mx.array(1.0)))  # both ranks start the update together
        start = time.perf_counter()
        if profile is not None and len(times) >= 2:  # steady state: not the first (compiling) steps
            profile.enable()
        update(grads)
        if profile is not None:
            profile.disable()
        hosts.append(time.perf_counter() - start)
        mx.eval(model.parameters(), opt.state)
        mx.synchronize()
        times.append(time.perf_counter() - start)
        peaks.append(mx.get_peak_memory())
        del loss, grads
    times, hosts, peaks = times[2:], hosts[2:], peaks[2:]
    leaves = len(tree_flatten(model.trainable_parameters()))
    if profile is not None and group.rank() == 0:
        import pstats

        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    if group.rank() == 0:
        print("PROBE " + json.dumps({
            "variant": a.variant, "model": a.model, "bucket_mb": a.bucket_mb, "leaves": leaves, "ranks": group.size(),
            "params": sum(v.size for _, v in tree_flatten(model.trainable_parameters())),
            "opt_ms": 1e3 * sorted(times)[len(times) // 2], "min_ms": 1e3 * min(times),
            "host_ms": 1e3 * sorted(hosts)[len(hosts) // 2], "peak_gib": max(peaks) / 2**30,
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
