"""Raw transports on this host: gloo's ``all_reduce`` (what PyTorch DDP uses on CPU)
against distopt's ring on Open MPI (:class:`distopt.mpi_ring.MpiRing`: reduce-scatter +
all-gather), the same float32 buffer, interleaved rep by rep after a barrier.

Both move 2(N-1)/N of the buffer per rank. It tells whether a difference in a full
step (``distopt bench``'s opt column) comes from the transport or from elsewhere
(PyTorch DDP overlapping its all-reduce with the backward pass):

    distopt launch -n 4 --backend mpi benchmarks/transport_probe.py --mib 256

Needs PyTorch (``pip install -e ".[bench]"``). Rank 0 prints the medians and their ratio.
"""

import argparse
import os
import statistics
import time

import mlx.core as mx

import distopt


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--mlx-cache-gb", type=float, default=None, help="mx.set_cache_limit (distopt's optimizer raises it to its step buffers)")
    p.add_argument("--port", type=int, default=29533, help="gloo's rendezvous port on 127.0.0.1")
    args = p.parse_args()
    group = distopt.init(backend="mpi")  # MLX initializes MPI; mpi4py shares it
    from mpi4py import MPI

    from distopt.mpi_ring import MpiRing

    import torch
    import torch.distributed as dist

    rank, n = group.rank(), group.size()
    if args.mlx_cache_gb is not None:
        mx.set_cache_limit(int(args.mlx_cache_gb * 2**30))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=n)
    elems = args.mib * 2**20 // 4 // n * n
    counts = [elems // n] * n
    flat = mx.ones((elems,), mx.float32)
    mx.eval(flat)
    tensor = torch.ones(elems)
    ring, comm = MpiRing(MPI.COMM_WORLD), MPI.COMM_WORLD

    def ring_step():
        part = ring.reduce_scatter([flat], counts)
        mx.eval(ring.all_gather(part, counts))

    timings = {"gloo all_reduce": [], "distopt MpiRing rs+ag": []}
    for _ in range(args.reps):
        for name, fn in (("gloo all_reduce", lambda: dist.all_reduce(tensor)), ("distopt MpiRing rs+ag", ring_step)):
            comm.Barrier()
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    if rank == 0:
        med = {k: 1e3 * statistics.median(v[2:]) for k, v in timings.items()}
        print(f"N={n}, {args.mib} MiB float32, median of {args.reps - 2} reps: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()))
        print(f"gloo / distopt ring = {med['gloo all_reduce'] / med['distopt MpiRing rs+ag']:.2f}")
    dist.barrier()  # no rank leaves (closing rank 0's rendezvous store) while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
