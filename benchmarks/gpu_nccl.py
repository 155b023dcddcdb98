"""NCCL checks on the GPU machine (issue 3): parity and reduce-scatter + all-gather timing.

Run one copy per GPU (see ``benchmarks/gpu_run.sh``)::

    MLX_RANK=r MLX_WORLD_SIZE=2 NCCL_HOST_IP=127.0.0.1 NCCL_PORT=29511 \\
        CUDA_VISIBLE_DEVICES=r python3 benchmarks/gpu_nccl.py --out nccl_rank_r.json

1. Parity: ``distopt.Adamax`` (stage 1 and 2) against ``nn.average_gradients`` +
   ``mlx.optimizers.Adamax`` for several steps on a tree of odd-sized float32, float16
   and bfloat16 parameters, different gradients on every rank. Prints the largest
   difference of parameters and of the consolidated state per dtype.
2. Communication on one buffer (256 MiB by default): MLX's ``sum_scatter`` followed by
   ``all_gather`` (what distopt's native communicator runs) against one ``all_sum``, in
   the same run; and a whole ``distopt.Adamax`` update of a parameter of that size
   against ``all_sum`` + ``mlx.optimizers.Adamax``.

It also runs on the CPU ring backend (``--mib 4``) to test the script; there MLX has no
``sum_scatter``, so part 2 times distopt's update only.
"""

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

import distopt

SHAPES = {"a": ((1001,), mx.float32), "b": {"w": ((37, 13), mx.float32)}, "h": ((333,), mx.float16), "k": ((7, 9), mx.bfloat16)}
TOLERANCE = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}


def make_tree(spec, key):
    """A tree like ``spec`` of normal random arrays of the given shapes and dtypes."""
    out = {}
    for name, leaf in spec.items():
        key, sub = mx.random.split(key)
        out[name] = make_tree(leaf, sub) if isinstance(leaf, dict) else mx.random.normal(leaf[0], key=sub).astype(leaf[1])
    return out


def max_diff_by_dtype(a, b):
    """{dtype name: largest |a - b|} over the leaves of two trees of the same layout."""
    out = {}
    for (_, x), (_, y) in zip(tree_flatten(a), tree_flatten(b)):
        name = str(x.dtype).split(".")[-1]
        d = mx.max(mx.abs(x.astype(mx.float32) - y.astype(mx.float32))).item()
        out[name] = max(out.get(name, 0.0), d)
    return out


def parity(group, stage, steps=5):
    """Largest differences of parameters and state between distopt and MLX DP after ``steps``."""
    params = make_tree(SHAPES, mx.random.key(0))
    ref_params = dict(params)
    opt = distopt.Adamax(learning_rate=1e-2, group=group, stage=stage)
    ref = optim.Adamax(learning_rate=1e-2)
    for step in range(steps):
        grads = make_tree(SHAPES, mx.random.key(100 * step + group.rank() + 1))
        params = opt.apply_gradients(grads, params)
        mx.eval(params, opt.state)  # one method's collectives at a time, in the same order on every rank
        ref_params = ref.apply_gradients(nn.average_gradients(grads, group=group), ref_params)
        mx.eval(ref_params, ref.state)
    state = opt.consolidated_state()
    mx.eval(state)
    ref_state = {k: v for k, v in ref.state.items() if k not in ("step", "learning_rate")}
    state = {k: state[k] for k in ref_state}
    pdiff, sdiff = max_diff_by_dtype(params, ref_params), max_diff_by_dtype(state, ref_state)
    ok = all(d <= TOLERANCE[name] for diffs in (pdiff, sdiff) for name, d in diffs.items())
    comm = getattr(getattr(opt, "comm", None), "name", "?")
    return {"stage": stage, "steps": steps, "communicator": comm, "param_max_diff": pdiff, "state_max_diff": sdiff, "pass": ok}


def timed(fn, group, repeats=10, warmup=3):
    """Median and spread (ms) of ``fn()``, each run started together on all ranks."""
    one = mx.array(1.0)
    times = []
    for i in range(warmup + repeats):
        mx.eval(mx.distributed.all_sum(one, group=group))
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times)}


def comm_timing(group, mib, native):
    """Reduce-scatter + all-gather against one all_sum of a ``mib`` MiB float32 buffer."""
    n = mib * 2**20 // 4
    x = mx.random.normal((n,))
    mx.eval(x)
    out = {"buffer_mib": mib, "all_sum": timed(lambda: mx.eval(mx.distributed.all_sum(x, group=group)), group)}
    log(group, "all_sum timed")
    if native:

        def rs_ag():
            part = mx.distributed.sum_scatter(x, group=group)
            mx.eval(mx.distributed.all_gather(part, group=group))

        def rs_then_ag():
            part = mx.distributed.sum_scatter(x, group=group)
            mx.eval(part)
            mx.eval(mx.distributed.all_gather(part, group=group))

        out["sum_scatter+all_gather"] = timed(rs_ag, group)
        out["sum_scatter, eval, all_gather"] = timed(rs_then_ag, group)
        out["ratio_rs_ag_vs_all_sum"] = out["sum_scatter+all_gather"]["median_ms"] / out["all_sum"]["median_ms"]
    w = {"w": mx.random.normal((n,))}
    g = {"w": mx.random.normal((n,), key=mx.random.key(group.rank() + 7))}
    mx.eval(w, g)
    log(group, "distopt.Adamax update timing")
    for bucket_mib in (64, mib):
        opt = distopt.Adamax(1e-4, group=group, bucket_bytes=bucket_mib * 2**20)
        out[f"distopt.Adamax update, {bucket_mib} MiB buckets"] = timed(lambda: mx.eval(opt.apply_gradients(g, w), opt.state), group)
    ref = optim.Adamax(1e-4)
    out["average_gradients + mlx Adamax update"] = timed(
        lambda: mx.eval(ref.apply_gradients(nn.average_gradients(g, group=group), w), ref.state), group
    )
    return out


def log(group, text):
    print(f"[rank {group.rank()}] {text}", file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256, help="buffer size for the timing, MiB")
    p.add_argument("--out", default=None, help="write this rank's results as JSON")
    args = p.parse_args()
    group = distopt.init()
    backend = distopt.group.backend_of(group)
    result = {"rank": group.rank(), "size": group.size(), "backend": backend, "device": str(mx.default_device())}
    log(group, f"backend {backend}; timing {args.mib} MiB")
    result["comm"] = comm_timing(group, args.mib, native=backend in ("nccl", "jaccl"))
    result["parity"] = []
    for stage in (1, 2):
        log(group, f"parity, stage {stage}")
        result["parity"].append(parity(group, stage))
    text = json.dumps(result, indent=1)
    if group.rank() == 0:
        print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if not all(r["pass"] for r in result["parity"]):
        raise SystemExit(f"rank {group.rank()}: parity FAILED")


if __name__ == "__main__":
    main()
