"""The ring reduce-scatter's kept scratch buffers against fresh ones, in one launch.

With 4 or more ranks the ring's middle steps receive running sums into scratch memory.
distopt keeps those buffers between calls (``ByteRing._scratch``); this probe times
the reduce-scatter + all-gather of a buffer with them and with a fresh ``np.empty`` per
step (what distopt did before), the two variants taking turns rep by rep, and prints the
medians and the paired ratio kept / fresh [90% interval]:

    distopt launch -n 4 --backend mpi benchmarks/scratch_probe.py --sizes 4,16,64,256
    distopt launch -n 4 --backend ring benchmarks/scratch_probe.py --sizes 4,16,64,256
"""

import argparse
import statistics

import mlx.core as mx
import numpy as np

import distopt
from bench_comm import MIB, barrier, distopt_time
from distopt.bench.stats import paired_ratio
from distopt.comm import make_communicator
from distopt.layout import FlatLayout


def fresh_scratch(ring, key, n, dtype):
    return np.empty(n, dtype)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="4,16,64,256", help="MiB, comma-separated")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--cpu", action="store_true", help="keep the buffers on the CPU (MLX CUDA builds)")
    args = parser.parse_args()
    if args.cpu:
        mx.set_default_device(mx.cpu)
    group = distopt.init()
    mx.set_cache_limit(8 << 30)  # as the optimizer raises it: MLX's own buffers come from its cache
    comm = make_communicator(group)
    if not hasattr(comm, "ring"):
        raise SystemExit(f"scratch_probe.py: the {comm.name} path has no byte ring (run it on --backend ring or mpi)")
    ring_class, n = type(comm.ring), group.size()
    kept = ring_class._scratch
    for mib in map(int, args.sizes.split(",")):
        elems = mib * MIB // 4 // n * n
        x = mx.random.normal((elems,), key=mx.random.key(group.rank()))
        mx.eval(x)
        buf = FlatLayout({"x": x}, n, 2 * elems * 4).buffers["float32"]
        times = {"kept": [], "fresh": []}
        for rep in range(2 + args.reps):  # 2 warm-up reps
            for variant in ("kept", "fresh") if rep % 2 else ("fresh", "kept"):
                ring_class._scratch = kept if variant == "kept" else fresh_scratch
                barrier(group)
                seconds = distopt_time(comm, buf, x)
                if rep >= 2:
                    times[variant].append(seconds)
        ring_class._scratch = kept
        if group.rank() == 0:
            ratio, interval = paired_ratio(times["kept"], times["fresh"])
            spread = f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
            print(f"{comm.name} N={n} {mib} MiB: kept {statistics.median(times['kept']) * 1e3:.1f} ms, "
                  f"fresh {statistics.median(times['fresh']) * 1e3:.1f} ms, kept / fresh {ratio:.2f} {spread}", flush=True)


if __name__ == "__main__":
    main()
