"""Rank script: every communication path named on the command line, checked end to end.

    comm_check.py ring,allsum        # paths to drive (DISTOPT_COMM values)

For each path:

1. ``collectives``: reduce-scatter and all-gather of integer-valued float32, bfloat16
   and float16 buffers (sums exact in any order, so results must be bitwise equal at
   every N), of 1 to 100003 elements, with equal and unequal shard weights (some parts
   empty), against sums computed locally from every rank's seeded data; the bytes
   counted per call must be the ring minimum. At N=2, random half-precision data must
   sum bitwise like MLX's own addition.
2. ``parity``: distopt.Adamax / SGD for 3 steps on float32 + bfloat16 + float16
   parameters (odd sizes, a buffer smaller than N elements, 64-byte buckets, a
   column-major float32 gradient as ``nn.Linear`` gives, split across parts), equal
   and unequal shards, against ``all_sum(g) / N`` + the mlx.optimizers optimizer:
   bitwise at N<=2, within float32 (float32) or half-precision rounding at N=3,4.
   ``comm_report()`` of the equal-shard runs must equal 2(N-1)/N of the padded flat
   buffers (3(N-1)/N for allsum).
3. ``compiled``: the Adamax step under ``mx.compile`` (eager-only paths fall back to
   all_sum there) matches the reference the same way.

Prints ``OK <path> <check>`` lines and ``DONE <path>``; any failure raises.
"""

import os
import sys
import time
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import distopt
from distopt.comm import make_communicator
from distopt.layout import Bucket, FlatLayout

SIZES = (1, 3, 5, 64, 1001, 100003)
DTYPES = (mx.float32, mx.bfloat16, mx.float16)


def check(cond, *what):
    if not cond:
        raise AssertionError(" ".join(map(str, what)))


def expected_traffic(bucket, rank, itemsize, path, ways=1):
    """(sent, received) bytes of reduce-scatter + all-gather of one bucket (``ways``: how
    many directions round the ring the tcp path streams)."""
    p, c, n = bucket.stop - bucket.start, bucket.counts, len(bucket.counts)
    if path == "allsum":
        rs = 2 * (p - p // n)
        ag = (n - 1) * max(c)
        return (rs + ag) * itemsize, (rs + ag) * itemsize
    sent = (p - c[rank]) + (p - c[(rank + 1) % n])
    received = (p - c[(rank - 1) % n]) + (p - c[rank])
    if path == "ring" and n > 2 and os.environ.get("DISTOPT_BACKEND") == "ring" and len(set(c)) > 1:
        # Both directions: first halves of the parts go right, the rest left; the
        # all-gather of unequal parts goes right only.
        first = [k // 2 for k in c]
        second = [k - k // 2 for k in c]
        received = (sum(first) - first[(rank - 1) % n]) + (sum(second) - second[(rank + 1) % n]) + (p - c[rank])
    if path == "tcp" and ways == 2 and n > 2 and len(set(c)) > 1:
        # Streamed both ways: the first halves of the parts go right, the rest left,
        # in the reduce-scatter and the all-gather alike.
        first = [k // 2 for k in c]
        second = [k - k // 2 for k in c]
        sent = (p - c[rank]) + (sum(first) - first[(rank + 1) % n]) + (sum(second) - second[(rank - 1) % n])
        received = (sum(first) - first[(rank - 1) % n]) + (sum(second) - second[(rank + 1) % n]) + (p - c[rank])
    return sent * itemsize, received * itemsize


def collectives(path, group):
    rank, n = group.rank(), group.size()
    comm = make_communicator(group, equal_parts=False, choice=path)
    ways = len(comm.ring.ways) if path == "tcp" else 1
    start = time.perf_counter()
    for size in SIZES:
        for weights in (None, list(range(1, n + 1))):
            for dtype in DTYPES:
                bucket_bytes = 64 if size <= 64 else 1024 if size < 2000 else 1 << 16
                layout = FlatLayout({"x": mx.zeros((size,), dtype)}, n, bucket_bytes, weights)
                buf = next(iter(layout.buffers.values()))
                xs = [mx.random.randint(-8, 8, (buf.padded_size,), key=mx.random.key(q)).astype(dtype) for q in range(n)]
                total = sum(x.astype(mx.float32) for x in xs)
                for bucket in buf.buckets:
                    lo, hi = bucket.part(rank)
                    comm.traffic.reset()
                    part = comm.reduce_scatter(xs[rank][bucket.start : bucket.stop], bucket)
                    where = (path, size, weights, dtype, bucket)
                    check(part.dtype == dtype and mx.array_equal(part.astype(mx.float32), total[lo:hi]).item(), "reduce_scatter", *where)
                    full = comm.all_gather(xs[rank][lo:hi], bucket)
                    expected = mx.concatenate([xs[q][slice(*bucket.part(q))] for q in range(n)])
                    check(full.dtype == dtype and mx.array_equal(full, expected).item(), "all_gather", *where)
                    counted = (comm.traffic.total_sent(), comm.traffic.total_received())
                    check(counted == expected_traffic(bucket, rank, dtype.size, path, ways), "traffic", counted, *where)
                    seg, cut = xs[rank][bucket.start : bucket.stop], (bucket.stop - bucket.start) // 3
                    pieces = [seg[:1], seg[1 : 1 + cut], seg[1 + cut :]]  # as the step passes a bucket's leaf slices
                    part = comm.reduce_scatter_pieces([p for p in pieces if p.size], bucket)
                    check(mx.array_equal(part.astype(mx.float32), total[lo:hi]).item(), "reduce_scatter_pieces", *where)
    empty_parts(path, group, comm)
    if path == "mpi4py-ring":
        split_messages(group, comm)
    print(f"OK {path} collectives ({time.perf_counter() - start:.1f} s)", flush=True)
    if n == 2:
        half_rounding(path, group, comm)


def empty_parts(path, group, comm):
    """Parts of 0 elements (every other rank) are neither sent nor received, and sum right."""
    rank, n = group.rank(), group.size()
    counts = tuple((k % 2) * (k + 1) for k in range(n))
    bucket = Bucket(0, sum(counts), counts)
    xs = [mx.arange(bucket.stop, dtype=mx.float32) * (q + 1) for q in range(n)]
    lo, hi = bucket.part(rank)
    part = comm.reduce_scatter(xs[rank], bucket)
    check(mx.array_equal(part, sum(xs)[lo:hi]).item(), "empty parts reduce_scatter", path, counts)
    full = comm.all_gather(xs[rank][lo:hi], bucket)
    expected = mx.concatenate([xs[q][slice(*bucket.part(q))] for q in range(n)])
    check(mx.array_equal(full, expected).item(), "empty parts all_gather", path, counts)


def split_messages(group, comm):
    """mpi4py-ring cuts views into blocks of at most ``_MAX_BLOCK`` bytes (MPI counts are
    C ints); with 7-byte blocks every message is a derived datatype of many blocks."""
    import distopt.mpi_ring as mpi_ring

    rank, n = group.rank(), group.size()
    saved, mpi_ring._MAX_BLOCK = mpi_ring._MAX_BLOCK, 7
    try:
        for dtype in (mx.float32, mx.bfloat16):
            layout = FlatLayout({"x": mx.zeros((1001,), dtype)}, n, 1 << 20, list(range(1, n + 1)))
            bucket = next(iter(layout.buffers.values())).buckets[0]
            xs = [mx.random.randint(-8, 8, (bucket.stop,), key=mx.random.key(q)).astype(dtype) for q in range(n)]
            lo, hi = bucket.part(rank)
            seg, cut = xs[rank], bucket.stop // 3
            part = comm.reduce_scatter_pieces([seg[:cut], seg[cut:]], bucket)
            check(mx.array_equal(part, sum(x.astype(mx.float32) for x in xs)[lo:hi].astype(dtype)).item(), "split reduce_scatter", dtype)
            full = comm.all_gather(xs[rank][lo:hi], bucket)
            check(mx.array_equal(full, mx.concatenate([xs[q][slice(*bucket.part(q))] for q in range(n)])).item(), "split all_gather", dtype)
    finally:
        mpi_ring._MAX_BLOCK = saved


def half_rounding(path, group, comm):
    """Random half-precision data: the sum of two ranks is bitwise MLX's own addition."""
    rank = group.rank()
    for dtype in (mx.bfloat16, mx.float16):
        layout = FlatLayout({"x": mx.zeros((4099,), dtype)}, 2)
        bucket = next(iter(layout.buffers.values())).buckets[0]
        xs = [(mx.random.normal((bucket.stop,), key=mx.random.key(10 + q)) * 3).astype(dtype) for q in range(2)]
        lo, hi = bucket.part(rank)
        part = comm.reduce_scatter(xs[rank], bucket)
        check(mx.array_equal(part, (xs[0] + xs[1])[lo:hi]).item(), "half rounding", path, dtype)
    print(f"OK {path} half_rounding", flush=True)


def make_params(key):
    """Mixed dtypes, odd sizes; the float16 buffer has fewer elements than ranks."""
    k = mx.random.split(key, 5)
    return {
        "w": mx.random.normal((7, 13), key=k[0]),
        "b": mx.random.normal((3,), key=k[1]),
        "emb": mx.random.normal((5, 3), key=k[2]).astype(mx.bfloat16),
        "layers": [{"g": mx.random.normal((11,), key=k[3]).astype(mx.bfloat16)}, {"s": mx.random.normal((1,), key=k[4]).astype(mx.float16)}],
    }


def close(a, b, exact):
    for (_, u), (_, v) in zip(tree_flatten(a), tree_flatten(b)):
        if u.dtype != v.dtype:
            return False
        if exact and not mx.array_equal(u, v).item():
            return False
        rtol = 1e-5 if u.dtype == mx.float32 else 2e-2
        if not exact and not mx.allclose(u.astype(mx.float32), v.astype(mx.float32), rtol=rtol, atol=rtol).item():
            return False
    return True


def parity(path, group, compiled=False):
    rank, n = group.rank(), group.size()
    exact = n <= 2
    configs = [
        (optim.Adamax, distopt.Adamax, dict(learning_rate=0.01), None, 64),
        (optim.SGD, distopt.SGD, dict(learning_rate=0.05, momentum=0.9, weight_decay=0.01), None, 1 << 20),
        (optim.Adamax, distopt.Adamax, dict(learning_rate=0.01), list(range(1, n + 1)), 64),
        (optim.Adamax, distopt.Adamax, dict(learning_rate=0.01), list(range(1, n + 1)), 1 << 20),
    ]
    for mlx_cls, cls, kwargs, weights, bucket_bytes in configs[:1] if compiled else configs:
        params = make_params(mx.random.key(0))
        ref_params = tree_map(lambda x: x, params)
        opt = cls(**kwargs, group=group, bucket_bytes=bucket_bytes, shard_weights=weights)
        ref = mlx_cls(**kwargs)
        opt.init(params)
        step = opt.apply_gradients
        if compiled:
            step = partial(mx.compile, inputs=[opt.state], outputs=[opt.state])(opt.apply_gradients)
        for s in range(3):
            grads = tree_map(lambda p: (mx.random.normal(p.shape, key=mx.random.key(100 * s + rank)) * (rank + 1)).astype(p.dtype), params)
            # nn.Linear's weight gradient is column-major: the tcp and mpi4py-ring paths send its rows as they lie
            grads["w"] = mx.random.normal(grads["w"].shape[::-1], key=mx.random.key(100 * s + rank + 50)).T
            mx.eval(grads)
            params = step(grads, params)
            mx.eval(params, opt.state)
            # One all_sum per eval: ranks evaluate different shards, so one graph of several
            # collectives could run them in different orders on different ranks.
            mean = {}
            for k, g in tree_flatten(grads):
                mean[k] = mx.distributed.all_sum(g, group=group) / n
                mx.eval(mean[k])
            ref_params = ref.apply_gradients(tree_unflatten(list(mean.items())), ref_params)
            mx.eval(ref_params)
            where = (path, mlx_cls.__name__, "weights", weights, "step", s, "compiled", compiled)
            check(close(params, ref_params, exact), "parameters differ", *where)
            if not compiled and weights is None and n > 1:
                comm_bytes(path, opt, n)
        state = {k: v for k, v in opt.consolidated_state().items() if k not in ("step", "learning_rate")}
        ref_state = {k: v for k, v in ref.state.items() if k not in ("step", "learning_rate")}
        check(close(state, ref_state, exact), "state differs", *where)
    print(f"OK {path} parity{' compiled' if compiled else ''}", flush=True)


def comm_bytes(path, opt, n):
    """Per step: (N-1)/N of the padded flat buffers each way per op (allsum: 2x for reduce)."""
    report = opt.comm_report()
    check(report["path"] == path, "path", report)
    flat = report["flat_bytes"]
    rs = (2 if path == "allsum" else 1) * (n - 1) * flat // n
    ag = (n - 1) * flat // n
    for key in ("step_sent", "step_received"):
        check(report[key] == {"reduce_scatter": rs, "all_gather": ag}, key, report, rs, ag)


def refusals(group, backend):
    """A path the backend lacks, or a buffer of the wrong length, is refused before any collective."""
    expected = {
        "native": "sum_scatter exists only on the nccl and jaccl backends",
        "bogus": "Unknown communication path 'bogus'",
    }
    expected.update({"mpi4py": "needs the mpi backend"} if backend == "ring" else {"tcp": "DISTOPT_COMM=tcp needs the ring backend"})
    for choice, message in expected.items():
        try:
            make_communicator(group, choice=choice)
        except ValueError as e:
            check(message in str(e), "wrong message", choice, e)
        else:
            check(False, "accepted", choice)
    for path in ("ring", "tcp", "allsum") if backend == "ring" else ("ring", "allsum"):
        comm = make_communicator(group, choice=path)
        bucket = Bucket(0, 2 * group.size(), (2,) * group.size())
        for call, x in ((comm.reduce_scatter, mx.zeros((3,))), (comm.all_gather, mx.zeros((3,)))):
            try:
                call(x, bucket)
            except ValueError as e:
                check("expected a flat buffer of" in str(e) and "got shape (3,)" in str(e), "wrong message", e)
            else:
                check(False, "accepted a buffer of the wrong length", path)
    print("OK refusals", flush=True)


def main():
    group = distopt.init()
    if group.size() > 1:
        refusals(group, os.environ.get("DISTOPT_BACKEND"))
    for path in sys.argv[1].split(","):
        os.environ["DISTOPT_COMM"] = path
        start = time.perf_counter()
        if group.size() > 1:
            collectives(path, group)
        parity(path, group)
        parity(path, group, compiled=True)
        print(f"DONE {path} in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
