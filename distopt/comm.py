"""Reduce-scatter and all-gather of flat buckets, chosen per backend.

A communicator has one job: ``reduce_scatter(flat, bucket)`` returns this rank's part
of the elementwise sum of ``flat`` over all ranks, and ``all_gather(part, bucket)``
returns the full bucket from every rank's part. Each call also adds to ``traffic``
the bytes this rank sends and receives, as the algorithm moves them.

- :class:`NativeComm`: MLX's ``sum_scatter`` and ``all_gather`` (NCCL, JACCL).
- :class:`MpiComm`: Open MPI's ``Reduce_scatter``/``Allgatherv`` through mpi4py,
  on zero-copy NumPy views of the MLX buffers (MPI backend).
- :class:`AllSumComm`: ``all_sum`` then slice; moves 1.5x the bytes of the others
  and is the last resort.
"""

import logging
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .group import backend_of

log = logging.getLogger("distopt")


@dataclass
class Traffic:
    """Bytes this rank sent and received, per operation."""

    sent: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)

    def add(self, op, sent, received):
        self.sent[op] = self.sent.get(op, 0) + sent
        self.received[op] = self.received.get(op, 0) + received

    def total_sent(self):
        return sum(self.sent.values())

    def total_received(self):
        return sum(self.received.values())

    def reset(self):
        self.sent.clear()
        self.received.clear()


def ring_bytes(bucket, rank, itemsize):
    """Bytes a rank sends in a ring reduce-scatter (or all-gather) of ``bucket``.

    Every part but one passes through every rank once, so each rank sends and
    receives ``(P - c) * itemsize`` bytes, where ``P`` is the bucket length and
    ``c`` one part: 2(N-1)/N of the bucket for reduce-scatter plus all-gather.
    """
    n = len(bucket.counts)
    return (bucket.stop - bucket.start - bucket.counts[(rank + 1) % n]) * itemsize


def traced(x):
    """True when ``x`` is a placeholder inside ``mx.compile`` (it cannot be evaluated)."""
    try:
        mx.eval(x)
        return False
    except ValueError as e:
        if "function transformations" in str(e):
            return True
        raise


class Communicator:
    """Base: the group, its rank and size, and the traffic counter."""

    name = "base"

    def __init__(self, group):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.traffic = Traffic()

    def _count(self, op, bucket, itemsize):
        nbytes = ring_bytes(bucket, self.rank, itemsize)
        self.traffic.add(op, nbytes, nbytes)


class NativeComm(Communicator):
    """MLX's own ``sum_scatter`` + ``all_gather``: NCCL and JACCL, equal parts only."""

    name = "native"

    def reduce_scatter(self, flat, bucket):
        self._count("reduce_scatter", bucket, flat.dtype.size)
        return mx.distributed.sum_scatter(flat, group=self.group)

    def all_gather(self, part, bucket):
        self._count("all_gather", bucket, part.dtype.size)
        return mx.distributed.all_gather(part, group=self.group)


class AllSumComm(Communicator):
    """``all_sum`` then slice, and a padded ``all_gather``: works everywhere, costs 1.5x."""

    name = "all_sum"

    def reduce_scatter(self, flat, bucket):
        nbytes = 2 * ring_bytes(bucket, self.rank, flat.dtype.size)
        self.traffic.add("reduce_scatter", nbytes, nbytes)
        lo, hi = bucket.part(self.rank)
        return mx.distributed.all_sum(flat, group=self.group)[lo - bucket.start : hi - bucket.start]

    def all_gather(self, part, bucket):
        self._count("all_gather", bucket, part.dtype.size)
        longest = max(bucket.counts)
        if part.shape[0] < longest:
            part = mx.concatenate([part, mx.zeros((longest - part.shape[0],), part.dtype)])
        rows = mx.distributed.all_gather(part[None], group=self.group)
        if all(c == longest for c in bucket.counts):
            return rows.reshape(-1)
        return mx.concatenate([rows[r, :c] for r, c in enumerate(bucket.counts)])


class MpiComm(Communicator):
    """Open MPI's collectives through mpi4py on zero-copy views of MLX memory.

    MLX's MPI backend has no ``sum_scatter``, and Open MPI's own collectives on
    NumPy views were measured faster than MLX's ``all_sum`` here. Half-precision
    buffers, which MPI cannot sum, and traced (compiled) steps go through
    :class:`AllSumComm`.
    """

    name = "mpi4py"

    def __init__(self, group):
        super().__init__(group)
        self.comm = _mpi_world()
        self.fallback = AllSumComm(group)
        self.fallback.traffic = self.traffic

    def _usable(self, x):
        return x.dtype not in (mx.float16, mx.bfloat16) and not traced(x)

    def reduce_scatter(self, flat, bucket):
        if not self._usable(flat):
            return self.fallback.reduce_scatter(flat, bucket)
        from mpi4py import MPI

        self._count("reduce_scatter", bucket, flat.dtype.size)
        out = _empty(bucket.counts[self.rank], flat.dtype)
        self.comm.Reduce_scatter(np.asarray(flat), np.asarray(out), list(bucket.counts), op=MPI.SUM)
        return out

    def all_gather(self, part, bucket):
        if not self._usable(part):
            return self.fallback.all_gather(part, bucket)
        self._count("all_gather", bucket, part.dtype.size)
        out = _empty(bucket.stop - bucket.start, part.dtype)
        displs = [sum(bucket.counts[:r]) for r in range(self.size)]
        self.comm.Allgatherv(np.asarray(part), [np.asarray(out), list(bucket.counts), displs, None])
        return out


def _empty(n, dtype):
    """An evaluated MLX buffer of ``n`` elements that MPI can write into in place."""
    out = mx.zeros((n,), dtype=dtype)
    mx.eval(out)
    return out


def _mpi_world():
    """mpi4py's world communicator, sharing the MPI that MLX already initialized."""
    import mpi4py

    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI

    return MPI.COMM_WORLD


def make_communicator(group, equal_parts=True):
    """The best communicator for ``group``'s backend."""
    backend = backend_of(group)
    if backend in ("nccl", "jaccl") and equal_parts:
        return NativeComm(group)
    if backend == "mpi":
        return MpiComm(group)
    log.warning("distopt: no reduce-scatter for backend %r; using all_sum + slice (1.5x the bytes).", backend)
    return AllSumComm(group)
