"""Reduce-scatter and all-gather around a ring, on NumPy byte views of MLX buffers.

The algorithm of :mod:`distopt.ring` in one direction, over any transport that can
send a list of byte views to rank r + 1 while receiving into a list of byte views from
rank r - 1 (:meth:`ByteRing._step`): plain sockets (:mod:`distopt.tcp`, the TCP ring
backend) or Open MPI's point-to-point calls through mpi4py (:mod:`distopt.mpi_ring`).
``np.asarray`` of an evaluated MLX array is a writable view of its memory, so the ring
reads gradients where they lie and receives straight into MLX buffers.

In step ``s = 0 .. N-2`` of the reduce-scatter rank r sends its running sum of part
``r - s - 1`` and receives the running sum of part ``r - s - 2``, to which it adds its
own values in place (half precision rounded as MLX adds), ending with the sum of its
own part: ``P - counts[r]`` elements sent, ``P - counts[r-1]`` received, the minimum.
The all-gather passes the finished parts round the same ring (N - 1 steps) and
receives each straight into its place in the output (or the caller's arrays).
Every step sends while receiving, so no rank waits on one that is itself sending: no
deadlock for any N and size, as long as the transport's send and receive of a step
run at once (a thread for sockets, non-blocking calls for MPI).
"""

import itertools

import numpy as np

from .buffers import HALF, as_dtype, numpy_view, receive_buffer
from .comm import half_sum_op
from .layout import ColumnBlock, dtype_name, join, spans


class ByteRing:
    """The ring algorithms; a subclass gives the transport (:meth:`_step`) and sets
    ``rank``, ``size`` and the byte counters ``sent`` and ``received``."""

    _kept = None  # scratch buffers kept between calls (:meth:`_scratch`), per ring

    def _step(self, outgoing, incoming):
        """Send the byte views ``outgoing`` (in order) to rank r + 1 while receiving into
        the byte views ``incoming`` (in order) from rank r - 1."""
        raise NotImplementedError

    def reduce_scatter(self, pieces, counts):
        """This rank's part of the elementwise sum of the flat buffer made of ``pieces``
        (consecutive 1-D arrays, e.g. slices of the gradient leaves, read where they lie:
        never joined); part k holds ``counts[k]`` elements."""
        starts, dtype = np.cumsum([0, *counts]), pieces[0].dtype
        if self.size == 1:
            return join(pieces)  # the sum over one rank
        flat = _Pieces([numpy_view(p) for p in pieces])
        return self._ring_sum([flat.range(starts[k], starts[k + 1]) for k in range(self.size)], counts, dtype)

    def reduce_scatter_segments(self, parts, counts):
        """:meth:`reduce_scatter` of a bucket given per part as wire-order segments
        (:meth:`distopt.layout.FlatLayout.part_segments`): a :class:`~distopt.layout.ColumnBlock`
        is sent and added column by column, as it lies in memory, and only this rank's
        finished part is put back in row order (1/N of the bucket instead of all of it).
        MLX's copy does that (blocked, :func:`distopt.layout._transpose_by_blocks`): adding
        straight into row order in NumPy took 10x a plain add, more than the copy saves."""
        dtype = _dtype(parts)
        out = self._ring_sum([[_wire(s) for s in segments] for segments in parts], counts, dtype)
        pieces, pos = [], 0
        for segment in parts[self.rank]:
            flat = out[pos : pos + segment.size]
            pieces.append(segment.row_major(flat) if isinstance(segment, ColumnBlock) else flat)
            pos += segment.size
        return join(pieces) if pieces else out

    def _ring_sum(self, own, counts, dtype):
        """The N - 1 ring steps of a reduce-scatter; ``own[k]`` are this rank's NumPy views
        of part k (any shapes; their bytes in order are the part). Returns the MLX buffer
        holding the sum of this rank's part, in the same order."""
        acc = own[(self.rank - 1) % self.size]
        for s in range(self.size - 1):
            k = (self.rank - s - 2) % self.size
            if s == self.size - 2:  # k is this rank's part: the result, an MLX buffer
                out = receive_buffer(counts[k], dtype)
                got = np.asarray(out)
            else:  # a running sum passed on next step: scratch, kept between calls
                got = self._scratch(s % 2, counts[k], np.uint16 if dtype in HALF.values() else np.dtype(dtype_name(dtype)))
            self._step([v for a in acc for v in _byte_views(a)], [_bytes(got)])
            _add_into(got, own[k], dtype)
            acc = [got]
        return as_dtype(out, dtype)

    def _scratch(self, key, n, dtype):
        """Scratch buffer ``key`` as ``n`` elements of NumPy ``dtype``; kept for the next
        call, grown as needed. The step-by-step reduce-scatter uses keys 0 and 1 (a step
        receives into one while it sends the other); a streamed one (:mod:`distopt.tcp`)
        one key per way and middle step, since a chunk waits in its sender's queue.

        Kept because fresh memory costs: a new large buffer's pages are faulted in and
        zeroed by the kernel as the socket or MPI first writes them. With 4 ranks on 2
        cores a reduce-scatter + all-gather took 0.68-0.98x the time with kept buffers
        (MPI) and 0.80-0.91x from 16 MiB (``tcp``) (``benchmarks/scratch_probe.py``),
        and an MLP 100M's optimizer step 822 against 1421 ms (MPI). Step by step: two
        parts of the largest bucket at most (none with 2 ranks, one with 3); streamed,
        N - 2 parts: less than the largest bucket, so less than the flat reduce buffers
        of ``memory_report``, which the ring paths do not build (they read the gradients
        where they lie)."""
        nbytes = n * np.dtype(dtype).itemsize
        if self._kept is None:
            self._kept = {}
        if key not in self._kept or self._kept[key].nbytes < nbytes:
            self._kept.pop(key, None)  # the smaller one goes first
            self._kept[key] = np.empty(nbytes, np.uint8)
        return self._kept[key][:nbytes].view(dtype)

    def all_gather(self, part, counts, into=None):
        """The concatenation of every rank's ``part`` (rank k holds ``counts[k]`` elements).

        With ``into`` (consecutive writable 1-D NumPy arrays, e.g. views of the new
        parameter leaves, in the dtype :func:`~distopt.buffers.numpy_view` gives) the
        parts are received into them in place and nothing is returned.
        """
        starts = np.cumsum([0, *counts])
        out = None
        if into is None:
            out = receive_buffer(int(starts[-1]), part.dtype)
            into = [np.asarray(out)]
        full = _Pieces(into)
        slot = lambda k: full.range(starts[k % self.size], starts[k % self.size + 1])  # noqa: E731
        own, pos = numpy_view(part), 0
        for view in slot(self.rank):
            view[...] = own[pos : pos + view.size]
            pos += view.size
        self._pass_round(slot, starts)
        return None if out is None else as_dtype(out, part.dtype)

    def _pass_round(self, slot, starts):
        """The N - 1 ring steps of an all-gather: ``slot(k)`` are the views of part k in
        the output (elements ``starts[k]`` to ``starts[k + 1]``); this rank's is filled."""
        for s in range(self.size - 1):
            k = self.rank - s - 1
            self._step([_bytes(v) for v in slot(k + 1)], [_bytes(v) for v in slot(k)])



def _bytes(a):
    return memoryview(a).cast("B")


def _byte_views(a):
    """Byte views of ``a`` in order: one, or one per row where only the rows are contiguous
    (the wire view of a :class:`ColumnBlock` of some of a leaf's rows), sent without a copy."""
    if a.flags.c_contiguous:
        return [_bytes(a)]
    return [_bytes(row) for row in a]


def _wire(segment):
    """A segment's NumPy view in wire order (a :class:`ColumnBlock` column by column)."""
    return segment.wire() if isinstance(segment, ColumnBlock) else numpy_view(segment)


def _dtype(parts):
    first = next(s for segments in parts for s in segments)
    return first.rows.dtype if isinstance(first, ColumnBlock) else first.dtype


class _Pieces:
    """A flat buffer held as consecutive NumPy arrays, sliced without joining them: 1-D
    arrays, or 2-D ones whose rows are each contiguous (a :class:`ColumnBlock`'s wire
    view), whose elements count row by row."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.sizes = [a.size for a in arrays]
        self.starts = [0, *itertools.accumulate(self.sizes)][:-1]

    def range(self, lo, hi):
        """The views of ``arrays`` that hold elements ``lo`` to ``hi`` of the buffer, in order."""
        return [v for i, a, b in spans(self.starts, self.sizes, lo, hi) for v in _cut(self.arrays[i], a, b)]


def _cut(array, lo, hi):
    """Elements ``lo:hi`` of ``array`` (1-D, or 2-D counted row by row) as views: for a
    2-D array the end of a row, the whole rows, the start of a row (those there are)."""
    if array.ndim == 1:
        return [array[lo:hi]]
    width = array.shape[1]
    first, last = -(-lo // width), hi // width  # the whole rows: first .. last - 1
    if first > last:  # inside one row
        return [array[last, lo - last * width : hi - last * width]]
    head = [array[first - 1, lo - (first - 1) * width :]] if lo < first * width else []
    rows = [array[first:last]] if first < last else []
    tail = [array[last, : hi - last * width]] if hi > last * width else []
    return head + rows + tail


def _add_into(acc, own, dtype):
    """``acc += own`` in place for the consecutive arrays ``own``, rounded as MLX adds
    (half precision through float32)."""
    half_add = half_sum_op(dtype_name(dtype)) if dtype in HALF.values() else None
    pos = 0
    for piece in own:
        target = acc[pos : pos + piece.size].reshape(piece.shape)  # 2-D: a ColumnBlock's wire view
        if half_add:
            half_add(memoryview(piece), memoryview(target), None)
        else:
            np.add(target, piece, out=target)
        pos += piece.size
