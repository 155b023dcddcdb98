"""Reduce-scatter + all-gather through distopt's communicator vs one MLX ``all_sum``.

Run as ranks of any backend; every figure comes from the same run, with the two
operations interleaved rep by rep, which goes first alternating (each starts after a
1-element ``all_sum`` barrier), so load on the machine hits both alike:

    distopt launch -n 2 --backend ring benchmarks/bench_comm.py
    distopt launch -n 4 --backend mpi  benchmarks/bench_comm.py --sizes 4,64,256
    distopt launch -n 2 --backend ring benchmarks/bench_comm.py --paths ring,allsum --bucket-mib 4,16,64,0
    distopt launch -n 2 --backend ring benchmarks/bench_comm.py --mlx-cache-gb 8   # as a Mac's allocator

``distopt`` = reduce-scatter of a float32 buffer of SIZE MiB, bucket by bucket, then
all-gather of the parts (what a ZeRO step communicates); ``all_sum`` = one
``mx.distributed.all_sum`` of the whole buffer (what plain data parallelism does).
Both move 2(N-1)/N of the buffer, so the ideal ratio is 1.0. ``--paths auto`` uses
the communicator distopt picks for the backend (NCCL/JACCL: MLX's ``sum_scatter``).
``--bucket-mib 0`` means one bucket for the whole buffer. Rank 0 prints one line per
(path, bucket, size): median milliseconds of each, the ratio of the medians, and the
median of the per-rep ratios with its 90% interval
(:func:`distopt.bench.stats.paired_ratio`; ``-`` below 5 reps).
"""

import argparse
import itertools
import statistics
import time

import mlx.core as mx

import distopt
from distopt.bench.stats import paired_ratio
from distopt.comm import make_communicator
from distopt.group import backend_of
from distopt.layout import DEFAULT_BUCKET_BYTES, FlatLayout

MIB = 1024**2


def barrier(group):
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


def distopt_time(comm, buf, x):
    """Seconds of reduce-scatter (every bucket) + all-gather (every bucket) of ``x``."""
    start = time.perf_counter()
    parts = []
    for bucket in buf.buckets:
        parts.append(comm.reduce_scatter(x[bucket.start : bucket.stop], bucket))
        mx.eval(parts[-1])
    for bucket, part in zip(buf.buckets, parts):
        mx.eval(comm.all_gather(part, bucket))
    return time.perf_counter() - start


def all_sum_time(group, x):
    start = time.perf_counter()
    mx.eval(mx.distributed.all_sum(x, group=group))
    return time.perf_counter() - start


def bench(group, path, bucket_bytes, mib, reps, warmup):
    n = group.size()
    elems = mib * MIB // 4 // n * n  # a multiple of N: no padding, the same buffer for both
    x = mx.random.normal((elems,), key=mx.random.key(group.rank()))
    mx.eval(x)
    layout = FlatLayout({"x": x}, n, bucket_bytes or 2 * elems * 4)
    buf = layout.buffers["float32"]
    comm = make_communicator(group, choice=None if path == "auto" else path)
    ours, theirs = [], []
    for rep in range(warmup + reps):
        times = {}
        for which in ("ours", "theirs") if rep % 2 == 0 else ("theirs", "ours"):
            barrier(group)
            times[which] = distopt_time(comm, buf, x) if which == "ours" else all_sum_time(group, x)
        if rep >= warmup:
            ours.append(times["ours"])
            theirs.append(times["theirs"])
    return comm.name, len(buf.buckets), ours, theirs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="4,16,64,256", help="buffer sizes in MiB (float32)")
    parser.add_argument("--paths", default="auto", help="auto or DISTOPT_COMM values, comma-separated")
    parser.add_argument("--bucket-mib", default=str(DEFAULT_BUCKET_BYTES // MIB), help="bucket sizes in MiB; 0 = one bucket")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cpu", action="store_true", help="keep the buffers on the CPU (MLX CUDA builds)")
    parser.add_argument(
        "--mlx-cache-gb", type=float, default=None,
        help="mx.set_cache_limit in GiB (MLX's Linux CPU default keeps 32 MiB of freed buffers; on a Mac the limit is the memory limit)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.cpu:
        mx.set_default_device(mx.cpu)
    if args.mlx_cache_gb is not None:
        mx.set_cache_limit(int(args.mlx_cache_gb * 2**30))
    group = distopt.init()
    if group.size() < 2:
        raise SystemExit("bench_comm.py needs at least 2 ranks: distopt launch -n 2 benchmarks/bench_comm.py")
    rank0 = group.rank() == 0
    if rank0:
        cache = f", mlx cache limit {args.mlx_cache_gb:g} GiB" if args.mlx_cache_gb is not None else ""
        print(f"backend {backend_of(group)}, {group.size()} ranks, median of {args.reps} reps after {args.warmup} warm-up{cache}")
        print(f"{'path':>8} {'bucket':>8} {'buckets':>7} {'MiB':>5} {'distopt ms':>11} {'all_sum ms':>11} {'ratio':>6} {'paired, 90%':>17}")
    runs = itertools.product(args.paths.split(","), map(float, args.bucket_mib.split(",")), map(int, args.sizes.split(",")))
    for path, bucket_mib, mib in runs:
        bucket_bytes = int(bucket_mib * MIB)
        name, buckets, ours, theirs = bench(group, path, bucket_bytes, mib, args.reps, args.warmup)
        if rank0:
            label = f"{bucket_mib:g}M" if bucket_bytes else "whole"
            t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
            median, ci = paired_ratio(ours, theirs)
            paired = f"{median:.2f} [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else f"{median:.2f} [-]"
            print(f"{name:>8} {label:>8} {buckets:>7} {mib:>5} {t_ours * 1e3:>11.1f} {t_theirs * 1e3:>11.1f} {t_ours / t_theirs:>6.2f} {paired:>17}", flush=True)


if __name__ == "__main__":
    main()
