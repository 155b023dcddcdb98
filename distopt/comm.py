"""Reduce-scatter and all-gather of flat buckets, chosen per backend.

A communicator has one job: ``reduce_scatter(flat, bucket)`` returns this rank's part
of the elementwise sum of ``flat`` over all ranks, and ``all_gather(part, bucket)``
returns the full bucket from every rank's part. Each call adds to ``traffic`` the
bytes this rank sends and receives. For a bucket of ``P`` elements cut into parts
``c_0 .. c_{N-1}``, every path but the fallback moves the minimum:

.. math::

    \\text{sent}_r = (P - c_r) + (P - c_{r+1}), \\qquad
    \\text{received}_r = (P - c_{r-1}) + (P - c_r)

elements per bucket and step (reduce-scatter + all-gather), i.e. 2(N-1)/N of the
bucket for equal parts: what one ring all-reduce moves.

- :class:`NativeComm`: MLX's ``sum_scatter`` and ``all_gather`` (NCCL, JACCL; equal
  parts only).
- :class:`TcpComm`: the ring of :class:`distopt.byte_ring.ByteRing` on plain blocking
  sockets of its own between the ring hostfile's hosts (:class:`distopt.tcp.TcpRing`;
  default on the TCP ring, where it was measured faster than MLX's ``send``/``recv``
  and ``all_sum``).
- :class:`MpiRingComm`: the same ring on Open MPI's non-blocking point-to-point calls
  through mpi4py (:class:`distopt.mpi_ring.MpiRing`), on zero-copy NumPy views of MLX
  memory (default on MPI, measured faster there than the paths below).
- :class:`RingComm`: :class:`distopt.ring.Ring`, built from MLX ``send``/``recv``
  (``DISTOPT_COMM=ring``).
- :class:`MpiComm`: Open MPI's ``Reduce_scatter``/``Allgatherv`` through mpi4py, on
  zero-copy NumPy views of the MLX buffers (``DISTOPT_COMM=mpi4py``).
  float16/bfloat16 are summed by a user operation that adds in float32 and rounds to
  nearest even, as MLX does (the rings add the same way).
- :class:`AllSumComm`: ``all_sum`` then slice; 1.5x the bytes, the last resort.

``DISTOPT_COMM=native|mpi4py-ring|mpi4py|ring|tcp|allsum`` (or
``make_communicator(..., choice=)``) forces a path; a path the backend cannot run
raises a ``ValueError`` before any collective. Inside ``mx.compile`` (where nothing
can be evaluated mid-graph) the eager paths exchange halves with one MLX
``all_gather`` (two ranks, equal parts; the same bytes), gather equal parts with
MLX's ``all_gather``, and otherwise fall back to :class:`AllSumComm`, saying so once.
"""

import logging
import os
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .buffers import HALF, as_dtype, numpy_view, receive_buffer
from .evaluation import traced
from .group import backend_of
from .layout import ColumnBlock, dtype_name, join
from .ring import Ring

log = logging.getLogger("distopt")

CHOICES = ("native", "mpi4py-ring", "mpi4py", "ring", "tcp", "allsum")
_warned = set()


def _warn_once(key, message, *args):
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


@dataclass
class Traffic:
    """Bytes this rank sent and received, per operation: in total and in the last step."""

    sent: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)
    step_sent: dict = field(default_factory=dict)
    step_received: dict = field(default_factory=dict)
    steps: int = 0

    def add(self, op, sent, received):
        """Count ``sent`` and ``received`` bytes of operation ``op`` (totals and this step)."""
        for totals, n in ((self.sent, sent), (self.step_sent, sent), (self.received, received), (self.step_received, received)):
            totals[op] = totals.get(op, 0) + n

    def start_step(self):
        """Begin counting a new step (the totals keep accumulating)."""
        self.steps += 1
        self.step_sent.clear()
        self.step_received.clear()

    def total_sent(self):
        """Bytes sent since the start (or the last :meth:`reset`), all operations."""
        return sum(self.sent.values())

    def total_received(self):
        """Bytes received since the start (or the last :meth:`reset`), all operations."""
        return sum(self.received.values())

    def reset(self):
        """Zero every count."""
        for d in (self.sent, self.received, self.step_sent, self.step_received):
            d.clear()
        self.steps = 0


class Communicator:
    """Base: the group, its rank and size, and the traffic counter."""

    name = "base"
    lazy = False  # True: leave collectives in the graph (GPU backends); False: run each now

    def __init__(self, group):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.traffic = Traffic()
        self._chain = None

    def _ordered(self, x, collective):
        """``collective(x)``, run after this communicator's previous collective of the step.

        MLX runs the collectives of one lazy graph in its evaluation order, which
        depends on which arrays each rank has already evaluated (ranks slice different
        shards), so two ranks can start different collectives and hang or mix their
        data. Chaining every collective of a step to the previous one with
        ``mx.depends`` fixes one order on every rank, also inside ``mx.compile``.
        Outside ``mx.compile`` a CPU communicator (``lazy`` False) also runs the
        collective at once, in program order, as its send/recv and mpi4py paths do.
        """
        key = (traced(x, wait=not self.lazy), self.traffic.steps)
        if self._chain is not None and self._chain[1] == key:
            x = mx.depends(x, self._chain[0])
        out = collective(x)
        self._chain = (out, key)
        if not key[0] and not self.lazy:
            mx.eval(out)
        return out

    def reduce_scatter_pieces(self, pieces, bucket):
        """:meth:`reduce_scatter` of the flat buffer that the consecutive 1-D arrays
        ``pieces`` make up (a bucket's slices of the gradient leaves). Paths that can read
        the pieces where they lie (``tcp``) skip joining them into one copy."""
        return self.reduce_scatter(join(pieces), bucket)

    reads_segments = False  # True: reduce_scatter_segments takes a bucket as wire-order segments (tcp)

    gathers_into_leaves = False  # True: an eager step gathers into the new parameters (no gathered bucket)

    def gathers_into(self, part):
        """Whether :meth:`all_gather_into` can receive ``part``'s bucket straight into the
        caller's arrays (``tcp``, ``mpi4py-ring`` outside ``mx.compile``); else use :meth:`all_gather`."""
        return self.gathers_into_leaves and not traced(part)

    def _check(self, x, n, what):
        """Refuse a buffer of the wrong length before any rank waits on it (it would hang)."""
        if x.ndim != 1 or x.shape[0] != n:
            raise ValueError(f"{self.name} {what}: expected a flat buffer of {n} elements, got shape {tuple(x.shape)}.")

    def _count_ring(self, op, bucket, itemsize):
        """Count the bytes of a minimal (ring) reduce-scatter or all-gather of ``bucket``."""
        total, c, n, r = bucket.stop - bucket.start, bucket.counts, self.size, self.rank
        if op == "reduce_scatter":
            sent, received = total - c[r], total - c[(r - 1) % n]
        else:
            sent, received = total - c[(r + 1) % n], total - c[r]
        self.traffic.add(op, sent * itemsize, received * itemsize)


class NativeComm(Communicator):
    """MLX's own ``sum_scatter`` + ``all_gather``: NCCL and JACCL, equal parts only."""

    name = "native"
    lazy = True

    def reduce_scatter(self, flat, bucket):
        """This rank's part of the sum of ``flat`` over ranks (``sum_scatter``)."""
        self._check(flat, bucket.stop - bucket.start, "reduce_scatter")
        self._count_ring("reduce_scatter", bucket, flat.dtype.size)
        return self._ordered(flat, lambda x: mx.distributed.sum_scatter(x, group=self.group))

    def all_gather(self, part, bucket):
        """The whole bucket from every rank's ``part`` (``all_gather``)."""
        self._check(part, bucket.counts[self.rank], "all_gather")
        self._count_ring("all_gather", bucket, part.dtype.size)
        return self._ordered(part, lambda x: mx.distributed.all_gather(x, group=self.group))


class AllSumComm(Communicator):
    """``all_sum`` then slice, and a padded ``all_gather``: works everywhere, costs 1.5x.

    MLX's ring ``all_sum`` moves ``2 (P - P/N)`` elements per rank and direction; the
    padded all-gather ``(N-1) max_k c_k``.
    """

    name = "allsum"

    def reduce_scatter(self, flat, bucket):
        """This rank's part of the sum of ``flat``: the whole ``all_sum``, sliced."""
        self._check(flat, bucket.stop - bucket.start, "reduce_scatter")
        total = bucket.stop - bucket.start
        nbytes = 2 * (total - total // self.size) * flat.dtype.size
        self.traffic.add("reduce_scatter", nbytes, nbytes)
        lo, hi = bucket.part(self.rank)
        total = self._ordered(flat, lambda x: mx.distributed.all_sum(x, group=self.group))
        return total[lo - bucket.start : hi - bucket.start]

    def all_gather(self, part, bucket):
        """The whole bucket: parts padded to the longest, ``all_gather``-ed, unpadded."""
        self._check(part, bucket.counts[self.rank], "all_gather")
        longest = max(bucket.counts)
        nbytes = (self.size - 1) * longest * part.dtype.size
        self.traffic.add("all_gather", nbytes, nbytes)
        if part.shape[0] < longest:
            part = mx.concatenate([part, mx.zeros((longest - part.shape[0],), part.dtype)])
        rows = self._ordered(part[None], lambda x: mx.distributed.all_gather(x, group=self.group))
        if all(c == longest for c in bucket.counts):
            return rows.reshape(-1)
        return mx.concatenate([rows[r, :c] for r, c in enumerate(bucket.counts)])


class _Eager(Communicator):
    """A path that must evaluate its inputs. Inside ``mx.compile`` (nothing can be
    evaluated mid-graph) two ranks with equal parts exchange halves through one MLX
    ``all_gather`` (the same bytes) and equal parts are gathered by MLX's
    ``all_gather``; anything else uses :class:`AllSumComm`, saying so once."""

    def __init__(self, group):
        super().__init__(group)
        self.fallback = AllSumComm(group)
        self.fallback.traffic = self.traffic
        self.fallback._ordered = self._ordered  # one chain for all collectives of a step

    def reduce_scatter(self, flat, bucket):
        """This rank's part of the sum of ``flat`` over ranks."""
        self._check(flat, bucket.stop - bucket.start, "reduce_scatter")
        if not traced(flat):
            return self._reduce_scatter(flat, bucket)
        if self.size == 2 and len(set(bucket.counts)) == 1:
            return self._pair_reduce_scatter(flat, bucket)
        self._warn_compiled()
        return self.fallback.reduce_scatter(flat, bucket)

    def all_gather(self, part, bucket):
        """The whole bucket from every rank's ``part``."""
        self._check(part, bucket.counts[self.rank], "all_gather")
        compiled = traced(part)
        if len(set(bucket.counts)) == 1 and (compiled or self.equal_parts_by_mlx):
            self._count_ring("all_gather", bucket, part.dtype.size)
            return self._ordered(part, lambda x: mx.distributed.all_gather(x, group=self.group))
        if not compiled:
            return self._all_gather(part, bucket)
        self._warn_compiled()
        return self.fallback.all_gather(part, bucket)

    equal_parts_by_mlx = False  # True: gather equal parts with MLX's all_gather (measured faster there)

    def _pair_reduce_scatter(self, flat, bucket):
        """Two ranks: ``all_gather`` of the part each sends, plus this rank's own part."""
        c, peer = bucket.counts[0], 1 - self.rank
        self._count_ring("reduce_scatter", bucket, flat.dtype.size)
        rows = self._ordered(flat[peer * c : (peer + 1) * c][None], lambda x: mx.distributed.all_gather(x, group=self.group))
        return rows[peer] + flat[self.rank * c : (self.rank + 1) * c]

    def _warn_compiled(self):
        _warn_once(
            ("traced", self.name),
            "distopt: the %s reduce-scatter cannot run inside mx.compile beyond two ranks with equal shards; "
            "compiled steps use all_sum + slice (1.5x the bytes). Compile the model's gradient, not the optimizer step.",
            self.name,
        )


class _RingPath(_Eager):
    """A path whose ``self.ring`` (send/recv, sockets or MPI point-to-point) counts the bytes it moves."""

    def _moved(self, op, fn):
        """``fn()``, adding the bytes ``self.ring`` counted during it to ``op``'s traffic."""
        before = (self.ring.sent, self.ring.received)
        out = fn()
        self.traffic.add(op, self.ring.sent - before[0], self.ring.received - before[1])
        return out


class RingComm(_RingPath):
    """Reduce-scatter from MLX ``send``/``recv`` around the ring (:class:`distopt.ring.Ring`).

    On the TCP ring backend each step's sends and receives run concurrently, each on
    its own CPU stream (from 3 ranks on, half of every part goes each way round the
    ring); elsewhere they run in rank-parity order. Equal parts are gathered by MLX's
    ``all_gather``, already a ring moving (N-1)/N of the bucket.
    """

    name = "ring"
    equal_parts_by_mlx = True

    def __init__(self, group, duplex):
        super().__init__(group)
        self.ring = Ring(group, duplex)

    def _reduce_scatter(self, flat, bucket):
        return self._moved("reduce_scatter", lambda: self.ring.reduce_scatter(flat, bucket.counts))

    def _all_gather(self, part, bucket):
        return self._moved("all_gather", lambda: self.ring.all_gather(part, bucket.counts))


class _ByteRingComm(_RingPath):
    """The ring of :class:`distopt.byte_ring.ByteRing` (``self.ring``): reads gradient
    leaves where they lie and receives straight into MLX buffers or the new parameters."""

    def _reduce_scatter(self, flat, bucket):
        return self._moved("reduce_scatter", lambda: self.ring.reduce_scatter([flat], bucket.counts))

    def reduce_scatter_pieces(self, pieces, bucket):
        """The reduce-scatter read straight from the leaves' memory: no joined copy of the bucket."""
        n = sum(p.size for p in pieces)
        if len(pieces) == 1 or n != bucket.stop - bucket.start or traced(pieces):
            return self.reduce_scatter(join(pieces), bucket)  # the checks, or the compiled fallback
        return self._moved("reduce_scatter", lambda: self.ring.reduce_scatter(pieces, bucket.counts))

    def _all_gather(self, part, bucket):
        return self._moved("all_gather", lambda: self.ring.all_gather(part, bucket.counts))

    reads_segments = True

    def reduce_scatter_segments(self, parts, bucket):
        """:meth:`reduce_scatter` of a bucket given per part as wire-order segments
        (:meth:`distopt.layout.FlatLayout.part_segments`): column-major gradient rows are
        sent and summed as they lie in memory (:meth:`distopt.byte_ring.ByteRing.reduce_scatter_segments`)."""
        flat = [s for segments in parts for s in segments]
        if self.size == 1 or not any(isinstance(s, ColumnBlock) for s in flat):
            return self.reduce_scatter_pieces(flat, bucket)  # nothing to read in place (or compiled)
        for k, segments in enumerate(parts):
            if sum(s.size for s in segments) != bucket.counts[k]:
                raise ValueError(f"{self.name} reduce_scatter: part {k} holds {sum(s.size for s in segments)} elements, expected {bucket.counts[k]}.")
        return self._moved("reduce_scatter", lambda: self.ring.reduce_scatter_segments(parts, bucket.counts))

    gathers_into_leaves = True

    def all_gather_into(self, part, bucket, into):
        """:meth:`all_gather` received in place into ``into``: consecutive writable 1-D NumPy
        arrays (views of the new parameters) covering the bucket. No gathered copy."""
        self._check(part, bucket.counts[self.rank], "all_gather")
        self._moved("all_gather", lambda: self.ring.all_gather(part, bucket.counts, into=into))


class TcpComm(_ByteRingComm):
    """The ring on plain blocking sockets of its own (:class:`distopt.tcp.TcpRing`),
    between the hosts of the ring backend's hostfile."""

    name = "tcp"

    def __init__(self, group, host=None):
        super().__init__(group)
        from .tcp import TcpRing, ring_host

        self.ring = TcpRing(group, host or ring_host())


class MpiRingComm(_ByteRingComm):
    """The ring on Open MPI's non-blocking point-to-point calls through mpi4py
    (:class:`distopt.mpi_ring.MpiRing`), on zero-copy NumPy views of MLX memory.
    Equal parts are gathered by MLX's ``all_gather`` (``MPI_Allgather``, measured faster
    than the ring here), except into the new parameters (no gathered copy)."""

    name = "mpi4py-ring"
    equal_parts_by_mlx = True

    def __init__(self, group):
        super().__init__(group)
        from .mpi_ring import MpiRing

        self.ring = MpiRing(_world_of(group, self.name))


class MpiComm(_Eager):
    """Open MPI's collectives through mpi4py on zero-copy views of MLX memory.

    MLX's MPI backend has no ``sum_scatter``. ``np.asarray`` of an evaluated MLX
    array is a writable view of its memory, so MPI reads the gradient bucket and
    writes the result straight into MLX buffers. float16 and bfloat16 travel as
    uint16 and are summed by :func:`half_sum_op`.
    """

    name = "mpi4py"

    def __init__(self, group):
        super().__init__(group)
        self.comm = _world_of(group, self.name)

    def _reduce_scatter(self, flat, bucket):
        self._count_ring("reduce_scatter", bucket, flat.dtype.size)
        send, op = numpy_view(flat), _sum_op(flat.dtype)
        out = receive_buffer(bucket.counts[self.rank], flat.dtype)
        self.comm.Reduce_scatter(send, np.asarray(out), list(bucket.counts), op=op)
        return as_dtype(out, flat.dtype)

    def _all_gather(self, part, bucket):
        self._count_ring("all_gather", bucket, part.dtype.size)
        send = numpy_view(part)
        out = receive_buffer(bucket.stop - bucket.start, part.dtype)
        displs = [sum(bucket.counts[:r]) for r in range(self.size)]
        self.comm.Allgatherv(send, [np.asarray(out), list(bucket.counts), displs, None])
        return as_dtype(out, part.dtype)


_ops = {}


def _sum_op(dtype):
    """``MPI.SUM``, or for float16/bfloat16 a commutative user op on uint16 words."""
    from mpi4py import MPI

    if dtype not in HALF.values():
        return MPI.SUM
    name = dtype_name(dtype)
    if name not in _ops:
        _ops[name] = MPI.Op.Create(half_sum_op(name), commute=True)
    return _ops[name]


def half_sum_op(name):
    """``inout = in + inout`` on uint16 words holding ``name`` (float16 or bfloat16) values.

    Each pair is added in float32 and rounded to nearest even, which is exactly
    MLX's float16/bfloat16 addition (float32 holds every sum of two half values
    closely enough that rounding once more gives the correctly rounded result).
    """

    def add(inbuf, inoutbuf, datatype):
        a = np.frombuffer(inbuf, np.uint16)
        b = np.frombuffer(inoutbuf, np.uint16)
        with np.errstate(over="ignore", invalid="ignore"):  # inf and nan propagate as in MLX
            b[...] = _from_f32(_to_f32(a, name) + _to_f32(b, name), name)

    return add


def _to_f32(words, name):
    if name == "float16":
        return words.view(np.float16).astype(np.float32)
    return (words.astype(np.uint32) << 16).view(np.float32)


def _from_f32(x, name):
    if name == "float16":
        return x.astype(np.float16).view(np.uint16)
    bits = x.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def _mpi_world():
    """mpi4py's world communicator, sharing the MPI that MLX already initialized."""
    import mpi4py

    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _world_of(group, name):
    """mpi4py's world communicator, refused unless ``group`` is the whole MPI world."""
    comm = _mpi_world()
    if comm.Get_size() != group.size():
        raise ValueError(f"DISTOPT_COMM={name} needs the MPI world group; this group has {group.size()} of {comm.Get_size()} MPI ranks.")
    return comm


def make_communicator(group, equal_parts=True, choice=None):
    """The best communicator for ``group``'s backend, or the one ``choice`` names.

    Args:
        group (mx.distributed.Group): the ranks.
        equal_parts (bool): whether every bucket splits into equal parts (no
          ``shard_weights``); MLX's ``sum_scatter`` needs them.
        choice (str, optional): ``"native"``, ``"mpi4py-ring"``, ``"mpi4py"``, ``"ring"``, ``"tcp"`` or ``"allsum"``;
          default the ``DISTOPT_COMM`` environment variable, else automatic.
    """
    backend = backend_of(group)
    choice = choice or os.environ.get("DISTOPT_COMM") or _automatic(backend, equal_parts)
    if choice not in CHOICES:
        raise ValueError(f"Unknown communication path {choice!r} (DISTOPT_COMM); expected one of {', '.join(CHOICES)}.")
    if choice == "native":
        if backend not in ("nccl", "jaccl"):
            raise ValueError(f"MLX's sum_scatter exists only on the nccl and jaccl backends, not {backend!r}; use ring or mpi4py.")
        if not equal_parts:
            raise ValueError("MLX's sum_scatter needs equal shards; shard_weights need DISTOPT_COMM=allsum on this backend.")
        return NativeComm(group)
    if choice in ("mpi4py", "mpi4py-ring"):
        if backend != "mpi":
            raise ValueError(f"DISTOPT_COMM={choice} needs the mpi backend; this group runs on {backend!r}.")
        return MpiComm(group) if choice == "mpi4py" else MpiRingComm(group)
    if choice == "tcp":
        if backend != "ring":
            raise ValueError(f"DISTOPT_COMM=tcp needs the ring backend (its hostfile's addresses); this group runs on {backend!r}.")
        return TcpComm(group)
    if choice == "ring":
        if backend not in ("ring", "mpi"):
            raise ValueError(f"The send/recv ring needs the ring or mpi backend (MLX send/recv); this group runs on {backend!r}.")
        return RingComm(group, duplex=backend == "ring")
    _warn_once(("allsum", backend), "distopt: reduce-scatter by all_sum + slice on backend %r (1.5x the bytes of a ring).", backend)
    comm = AllSumComm(group)
    comm.lazy = backend in ("nccl", "jaccl")
    return comm


def gathers_into_leaves_by_default(backend):
    """Whether ``backend``'s automatic path gathers straight into the new parameters
    (no gathered bucket): what :func:`distopt.plan` counts."""
    path = _automatic(backend, equal_parts=True)
    return {"tcp": TcpComm, "mpi4py-ring": MpiRingComm}.get(path, Communicator).gathers_into_leaves


def _automatic(backend, equal_parts):
    if backend in ("nccl", "jaccl"):
        return "native" if equal_parts else "allsum"
    if backend == "ring":
        return "tcp"  # measured faster than MLX send/recv and all_sum on the ring (README, Communication)
    if backend == "mpi":
        return "mpi4py-ring"  # measured faster than Open MPI's Reduce_scatter and MLX send/recv (README, Communication)
    return "allsum"
