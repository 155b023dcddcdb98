"""Parameter tree <-> flat per-dtype buffers, split into buckets and rank shards.

All leaves of one dtype are laid end to end, in ``tree_flatten`` order, in one flat
buffer of ``size`` elements, padded with zeros to ``padded_size`` (a multiple of the
world size N: padding only at the end). The buffer is cut into buckets of about
``bucket_elems`` elements (a multiple of N, so only the last bucket holds padding),
and every bucket is split into N parts, one per rank: rank r owns part r of every
bucket. Its *shard* is those parts laid end to end; with equal weights every shard
has ``padded_size / N`` elements.

A bucket is reduced and gathered on its own, which bounds the extra memory of a
step to about one bucket and lets one bucket's communication overlap the next.
"""

import bisect
import itertools
from dataclasses import dataclass
from functools import cached_property

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .buffers import as_dtype, receive_buffer, receive_buffers
from .evaluation import traced

DEFAULT_BUCKET_BYTES = 256 * 1024**2  # chosen by measurement: README, "Buckets"


@dataclass(frozen=True)
class Entry:
    """One parameter inside a flat buffer: ``flat[offset : offset + size]``."""

    path: str
    shape: tuple
    offset: int
    size: int


@dataclass(frozen=True)
class Bucket:
    """``flat[start : stop]``, split into per-rank parts of ``counts[r]`` elements."""

    start: int
    stop: int
    counts: tuple

    def part(self, rank):
        """(lo, hi) of rank's part, as absolute positions in the flat buffer."""
        lo = self.start + sum(self.counts[:rank])
        return lo, lo + self.counts[rank]


@dataclass(frozen=True)
class Buffer:
    """The flat buffer of one dtype: its entries, padding and buckets."""

    dtype: mx.Dtype
    entries: tuple
    size: int
    padded_size: int
    buckets: tuple

    @property
    def name(self):
        """The buffer's dtype name, e.g. ``"float32"`` (its key in the optimizer state)."""
        return dtype_name(self.dtype)

    @cached_property
    def starts(self):
        """Every entry's offset, in order (for bisecting a flat position)."""
        return [e.offset for e in self.entries]

    @cached_property
    def sizes(self):
        """Every entry's element count, in order."""
        return [e.size for e in self.entries]

    def overlaps(self, lo, hi):
        """``(entry, a, b)`` for each entry holding elements of ``flat[lo:hi]``, in order:
        its elements ``a:b`` (the padding after the last entry is not an entry)."""
        for i, a, b in spans(self.starts, self.sizes, lo, hi):
            yield self.entries[i], a, b

    def padding(self, lo, hi):
        """How many elements of ``flat[lo:hi]`` are padding (zeros after the last entry)."""
        return max(hi - max(lo, self.size), 0)

    def shard_size(self, rank):
        """Elements of this buffer that ``rank`` owns: its part of every bucket."""
        return sum(b.counts[rank] for b in self.buckets)

    def part_starts(self, rank):
        """Where ``rank``'s part of each bucket begins in its shard, and the shard's end."""
        starts = [0]
        for bucket in self.buckets:
            starts.append(starts[-1] + bucket.counts[rank])
        return starts

    def shard_ranges(self, rank):
        """The (lo, hi) ranges of the flat buffer that make up rank's shard."""
        return [b.part(rank) for b in self.buckets]


def dtype_name(dtype):
    """``mx.float32`` -> ``"float32"``."""
    return str(dtype).rsplit(".", 1)[-1]


class Leaves(dict):
    """A tree's array leaves by path, as ``dict(tree_flatten(tree))``: flattened once."""

    @classmethod
    def of(cls, tree):
        """``tree``'s leaves (``tree`` itself if it already is :class:`Leaves`)."""
        return tree if isinstance(tree, cls) else cls(tree_flatten(tree))


def leaf_setter(model, paths):
    """A function ``place(path, array)`` that puts ``array`` in ``model`` (an ``nn.Module`` or
    a tree of dicts and lists) at ``path`` (a ``tree_flatten`` key), for each of ``paths``.

    ``Module.update`` takes a whole tree, and a partial one built by ``tree_unflatten``
    pads lists with empty dicts, which it would write over a list of arrays; so the
    parent of every path is looked up here, once. Raises a ValueError naming the first
    path that is not an array of ``model``.
    """
    slots = {}
    for path in paths:
        node, *keys, last = [model, *path.split(".")]
        try:
            for key in keys:
                node = node[int(key)] if isinstance(node, (list, tuple)) else node[key]
            key = int(last) if isinstance(node, list) else last
            found = isinstance(node, (dict, list)) and isinstance(node[key], mx.array)
        except (KeyError, IndexError, ValueError, TypeError):
            found = False
        if not found:
            raise ValueError(f"The model has no parameter '{path}' to update: the gradients hold it and the model does not.")
        slots[path] = (node, key)

    def place(path, array):
        node, key = slots[path]
        node[key] = array

    return place


def new_leaves_held(sizes, buckets, into):
    """Elements of new parameters that :meth:`ShardedOptimizer.update` holds at once
    beside the old ones, for a flat buffer of leaves of ``sizes`` (in order) cut into
    ``buckets``: the model takes each bucket's new leaves, freeing the old ones, once the
    bucket is gathered. Gathered into the new leaves (``into``), a bucket's gather holds
    every leaf it overlaps, allocated whole; cut out of gathered buckets, the leaves that
    end in it (a one-bucket buffer's are views of its gathered bucket: none).
    ``apply_gradients`` holds all of them until it returns."""
    if not into and len(buckets) < 2:
        return 0
    starts = [0, *itertools.accumulate(sizes)][:-1]
    ends_in = lambda i, b: starts[i] + sizes[i] <= b.stop  # noqa: E731
    return max(sum(sizes[i] for i, _, _ in spans(starts, sizes, b.start, b.stop) if into or ends_in(i, b)) for b in buckets)


def spans(starts, sizes, lo, hi):
    """``(i, a, b)`` for each of consecutive items (item i holds ``sizes[i]`` elements from
    position ``starts[i]`` on) that holds elements of ``[lo, hi)``: its elements ``a:b``,
    in order; empty items are skipped."""
    if not starts:
        return
    pos, i, end_all = lo, max(bisect.bisect_right(starts, lo) - 1, 0), starts[-1] + sizes[-1]
    while pos < min(hi, end_all):
        end = min(hi, starts[i] + sizes[i])
        if end > pos:
            yield i, pos - starts[i], end - starts[i]
        pos, i = max(pos, end), i + 1


def join(parts):
    """One flat array from a non-empty list of flat arrays (the array itself if only one)."""
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def cut_buckets(size, itemsize, weights, bucket_bytes):
    """``(padded_size, buckets)`` of a flat buffer of ``size`` elements of ``itemsize`` bytes.

    The buffer is padded to a multiple of N = ``len(weights)`` and cut into buckets of
    about ``bucket_bytes`` (a multiple of N elements, so only the last holds padding),
    each split into per-rank parts by :func:`split_counts`.
    """
    n = len(weights)
    padded = -(-max(size, 1) // n) * n
    step = max(n, bucket_bytes // itemsize // n * n)
    stops = [min(lo + step, padded) for lo in range(0, padded, step)]
    return padded, tuple(Bucket(lo, hi, split_counts(hi - lo, weights)) for lo, hi in zip(range(0, padded, step), stops))


def split_counts(total, weights):
    """Split ``total`` elements into ``len(weights)`` parts proportional to ``weights``.

    Equal weights give equal parts when ``total`` is a multiple of the number of
    parts. Rounding leftovers go to the first parts, so the counts always sum to
    ``total``.
    """
    scale = sum(weights)
    counts = [int(total * w // scale) for w in weights]
    for i in range(total - sum(counts)):
        counts[i % len(counts)] += 1
    return tuple(counts)


class FlatLayout:
    """Where every parameter of a tree lives in the flat, sharded buffers.

    Args:
        tree: a parameter (or gradient) tree of ``mx.array`` leaves.
        num_shards (int): the world size N.
        bucket_bytes (int): target bucket size in bytes (default 256 MiB).
        weights (list, optional): relative shard sizes per rank, e.g. each Mac's
          memory; equal shards by default.
    """

    def __init__(self, tree, num_shards, bucket_bytes=DEFAULT_BUCKET_BYTES, weights=None):
        if weights is not None and (len(weights) != num_shards or min(weights) <= 0):
            raise ValueError(f"weights must be {num_shards} positive numbers, one per rank; got {weights}.")
        self.num_shards = num_shards
        self.weights = tuple(weights) if weights is not None else (1,) * num_shards
        self.bucket_bytes = bucket_bytes
        leaves = [(k, v) for k, v in tree_flatten(tree) if isinstance(v, mx.array)]
        if not leaves:
            raise ValueError("The parameter tree is empty: there is nothing to optimize.")
        self.paths = [k for k, _ in leaves]
        self._order = {p: i for i, p in enumerate(self.paths)}
        self.buffers = {}
        for dtype in _dtypes_in_order(leaves):
            group = [(k, v) for k, v in leaves if v.dtype == dtype]
            buf = self._make_buffer(dtype, group)
            self.buffers[buf.name] = buf

    def _make_buffer(self, dtype, leaves):
        entries, offset = [], 0
        for path, leaf in leaves:
            entries.append(Entry(path, tuple(leaf.shape), offset, leaf.size))
            offset += leaf.size
        padded, buckets = cut_buckets(offset, dtype.size, self.weights, self.bucket_bytes)
        return Buffer(dtype, tuple(entries), offset, padded, buckets)

    @property
    def bucket_count(self):
        """Buckets of all buffers together."""
        return sum(len(b.buckets) for b in self.buffers.values())

    def signature(self):
        """Names, shapes and dtypes of all parameters, comparable across ranks."""
        return [[e.path, list(e.shape), name] for name, b in self.buffers.items() for e in b.entries]

    def check_tree(self, tree, what="gradients"):
        """Raise a ValueError naming the first leaf of ``tree`` that does not fit."""
        leaves = {k: v for k, v in Leaves.of(tree).items() if isinstance(v, mx.array)}
        for name, buf in self.buffers.items():
            for e in buf.entries:
                leaf = leaves.pop(e.path, None)
                if leaf is None:
                    raise ValueError(f"The {what} miss the parameter '{e.path}'.")
                if tuple(leaf.shape) != e.shape or dtype_name(leaf.dtype) != name:
                    raise ValueError(
                        f"The {what} of '{e.path}' have shape {tuple(leaf.shape)} and dtype "
                        f"{dtype_name(leaf.dtype)}; the optimizer expects {e.shape} and {name}."
                    )
        if leaves:
            raise ValueError(f"The {what} hold '{next(iter(leaves))}', which the optimizer was not initialized with.")

    def flat_range(self, tree, name, lo, hi):
        """``flatten(tree)[name][lo:hi]`` built from slices of the overlapping leaves only.

        ``tree`` may be :class:`Leaves` (flattened once for the many buckets of a step).
        """
        return join(self.flat_pieces(tree, name, lo, hi))

    def flat_pieces(self, tree, name, lo, hi):
        """The consecutive 1-D arrays (slices of the overlapping leaves, and zeros for any
        padding) that ``flatten(tree)[name][lo:hi]`` is made of, not yet joined."""
        buf, leaves = self.buffers[name], Leaves.of(tree)
        pieces = [_flat_slice(leaves[e.path], a, b) for e, a, b in buf.overlaps(lo, hi)]
        if buf.padding(lo, hi):
            pieces.append(mx.zeros((buf.padding(lo, hi),), dtype=buf.dtype))
        return pieces

    def bucket_leaves(self, tree, name, bucket):
        """The leaves of ``tree`` that hold elements of ``bucket`` of buffer ``name``, in order."""
        buf, leaves = self.buffers[name], Leaves.of(tree)
        return [leaves[e.path] for e, _, _ in buf.overlaps(bucket.start, bucket.stop)]

    def part_segments(self, tree, name, bucket):
        """For every rank's part of ``bucket``, the gradient segments that hold it, in
        *wire order*: 1-D slices (as :meth:`flat_pieces`) except that the whole rows of a
        column-major leaf (``nn.Linear``'s weight gradient) inside one part come as one
        :class:`ColumnBlock`, whose elements travel column by column: the leaf's own
        memory order, read without the flattening copy. Wire order permutes elements only
        within a part, so a ring reduce-scatter sums the same elements on every rank and
        only the finished part is put back in row order (:meth:`ColumnBlock.row_major`)."""
        buf, leaves = self.buffers[name], Leaves.of(tree)
        parts = []
        for k in range(len(bucket.counts)):
            lo, hi = bucket.part(k)
            segments = [s for e, a, b in buf.overlaps(lo, hi) for s in _leaf_segments(leaves[e.path], a, b)]
            if buf.padding(lo, hi):
                segments.append(mx.zeros((buf.padding(lo, hi),), dtype=buf.dtype))
            parts.append(segments)
        return parts

    def shard_parts(self, tree, name, rank):
        """Rank's part of every bucket of ``tree``'s flat ``name`` buffer (its shard, per bucket)."""
        leaves = Leaves.of(tree)
        return [self.flat_range(leaves, name, lo, hi) for lo, hi in self.buffers[name].shard_ranges(rank)]

    def unflatten(self, flats):
        """The tree of parameters held by the full (gathered) flat buffers ``flats``."""
        items = []
        for name, flat in flats.items():
            for e in self.buffers[name].entries:
                items.append((e.path, flat[e.offset : e.offset + e.size].reshape(e.shape)))
        return self.tree(items)

    def tree(self, items):
        """The parameter tree of ``(path, array)`` pairs, in the original leaf order."""
        return tree_unflatten(sorted(items, key=lambda kv: self._order[kv[0]]))

    def new_leaves(self, name):
        """:class:`NewLeaves` of buffer ``name``: its new parameters, for a gather to fill in place."""
        return NewLeaves(self.buffers[name])

    def unflatten_buckets(self, name, buckets):
        """The parameters of buffer ``name`` from its full buckets, each as soon as it can be built.

        ``buckets`` yields the full (gathered) buckets in order; for each one this yields
        the ``(path, array)`` pairs of the parameters that end in it. A parameter is
        copied out of the buckets that hold it (joined when it spans several), so no
        bucket outlives its last parameter: the step holds the new parameters plus about
        one bucket, never a second full flat copy. A one-bucket buffer gives views of it,
        as :meth:`unflatten` does.
        """
        buf = self.buffers[name]
        entries = iter(buf.entries)
        entry = next(entries, None)
        held = []  # (start, full bucket) that the next parameters still need
        for bucket, full in zip(buf.buckets, buckets):
            held.append((bucket.start, full))
            ready = []
            while entry is not None and entry.offset + entry.size <= bucket.stop:
                ready.append((entry.path, _cut(entry, held, buf.dtype, copy=len(buf.buckets) > 1)))
                entry = next(entries, None)
            held = [(s, b) for s, b in held if entry is not None and s + b.size > entry.offset]
            yield ready


class NewLeaves:
    """The new parameters of one flat buffer, as fresh arrays that a gather fills in place.

    :meth:`views` allocates the leaves that start in a bucket and gives the writable
    NumPy views that cover it, in order (scratch for any padding); once the bucket is
    gathered into them, :meth:`finished` gives the ``(path, array)`` pairs of the leaves
    that end in it, as :meth:`FlatLayout.unflatten_buckets` does, but with no gathered
    copy of the bucket to cut them from: one copy of the step's parameters fewer.
    """

    def __init__(self, buf):
        self.buf = buf
        self.open = {}  # path -> the leaf's evaluated MLX buffer, until its last bucket is in
        self.done = 0  # entries before this one were given out by finished()

    def views(self, bucket):
        """The NumPy views of the new leaves (and of scratch for the padding) that hold ``bucket``;
        the leaves that start in it are allocated here, all at once."""
        overlaps = list(self.buf.overlaps(bucket.start, bucket.stop))
        new = [e for e, _, _ in overlaps if e.path not in self.open]
        pad = self.buf.padding(bucket.start, bucket.stop)
        outs = receive_buffers([e.size for e in new] + ([pad] if pad else []), self.buf.dtype)
        self.open.update((e.path, out) for e, out in zip(new, outs))
        views = [np.asarray(self.open[e.path])[a:b] for e, a, b in overlaps]
        return views + ([np.asarray(outs[-1])] if pad else [])

    def finished(self, bucket):
        """``(path, array)`` of the parameters that end in ``bucket`` (filled by now)."""
        ready, entries = [], self.buf.entries
        while self.done < len(entries) and entries[self.done].offset + entries[self.done].size <= bucket.stop:
            e = entries[self.done]
            out = self.open.pop(e.path, None)
            if out is None:  # an empty leaf: no bucket holds any of it
                out = receive_buffer(0, self.buf.dtype)
            ready.append((e.path, as_dtype(out, self.buf.dtype).reshape(e.shape)))
            self.done += 1
        return ready


def _cut(entry, held, dtype, copy):
    """``entry``'s parameter from the held buckets ``(start, array)``: joined, or one piece copied."""
    lo, hi = entry.offset, entry.offset + entry.size
    pieces = [b[max(lo - s, 0) : min(hi - s, b.size)] for s, b in held if s < hi and s + b.size > lo]
    if not pieces:
        return mx.zeros(entry.shape, dtype)
    flat = mx.concatenate(pieces) if len(pieces) > 1 else mx.array(pieces[0]) if copy else pieces[0]
    return flat.reshape(entry.shape)


def _flat_slice(leaf, lo, hi):
    """``leaf.reshape(-1)[lo:hi]`` as a row-contiguous array, flattening only the rows of
    ``leaf`` that hold it.

    Flattening a non-contiguous leaf copies it (``nn.Linear``'s weight gradient is a
    transposed array), so flattening it whole for each bucket that holds part of it
    would copy all of it once per bucket. Rows of a contiguous leaf flatten to a view,
    as the whole leaf does; ``mx.contiguous`` copies only what is not (MLX may give a
    strided view, e.g. for one row of a transposed array, which a socket cannot send).
    """
    blocked = _transposed_and_large(leaf)
    if leaf.ndim >= 2 and hi - lo < leaf.size:
        row = leaf.size // leaf.shape[0]
        r0, r1 = lo // row, -(-hi // row)
        leaf, lo, hi = leaf[r0:r1], lo - r0 * row, hi - r0 * row
    if blocked:
        return _transpose_by_blocks(leaf).reshape(-1)[lo:hi]
    return mx.contiguous(leaf).reshape(-1)[lo:hi]  # any dimension count


@dataclass(frozen=True)
class ColumnBlock:
    """Whole rows ``rows`` (shape ``(r, c)``) of a column-major leaf, in wire order: column
    by column, i.e. ``rows.T`` flattened, which is how the leaf lies in memory."""

    rows: mx.array

    @property
    def size(self):
        return self.rows.size

    def wire(self):
        """A NumPy view ``(c, r)`` of the block in wire order (each of its rows contiguous)."""
        mx.eval(self.rows)
        return np.asarray(self.rows).T

    def row_major(self, flat):
        """``flat`` (this block's elements in wire order) put back in row order, flat."""
        r, c = self.rows.shape
        return _row_major(flat.reshape(c, r).T).reshape(-1)


def _leaf_segments(leaf, lo, hi):
    """``leaf.reshape(-1)[lo:hi]`` as wire-order segments: the whole rows of a column-major
    leaf as one :class:`ColumnBlock`, partial rows and other leaves as 1-D slices."""
    if _column_major(leaf):
        row = leaf.shape[1]
        r0, r1 = -(-lo // row), hi // row
        if r0 < r1:
            head = [_flat_slice(leaf, lo, r0 * row)] if lo < r0 * row else []
            tail = [_flat_slice(leaf, r1 * row, hi)] if r1 * row < hi else []
            return head + [ColumnBlock(leaf[r0:r1])] + tail
    return [_flat_slice(leaf, lo, hi)]


def _column_major(leaf):
    """True for an evaluated, column-major 2-D float32/float64 ``leaf`` on the CPU
    (``nn.Linear``'s weight gradient). Only a CPU step that evaluates its gradients
    anyway asks: a lazy or compiled graph (GPU, ``mx.compile``) is never evaluated here."""
    if leaf.ndim != 2 or mx.default_device() != mx.cpu or leaf.dtype.size not in (4, 8):
        return False
    if traced(leaf):
        return False
    return np.asarray(leaf).strides[0] == leaf.dtype.size


def _row_major(leaf):
    """2-D ``leaf`` as a row-contiguous array: through column blocks where that is faster."""
    return _transpose_by_blocks(leaf) if _transposed_and_large(leaf) else mx.contiguous(leaf)


# A column-major (transposed) 2-D leaf of at least BLOCKED_MIN_ELEMS elements is made
# row-major through column blocks of TRANSPOSE_BLOCK; see _transpose_by_blocks.
TRANSPOSE_BLOCK = 128
BLOCKED_MIN_ELEMS = 1 << 21


def _transposed_and_large(leaf):
    """True for a :func:`_column_major` ``leaf`` with at least ``BLOCKED_MIN_ELEMS``
    elements and more than one block of columns."""
    if leaf.ndim != 2 or leaf.size < BLOCKED_MIN_ELEMS or leaf.shape[1] <= TRANSPOSE_BLOCK:
        return False
    return _column_major(leaf)


def _transpose_by_blocks(leaf):
    """Column-major ``leaf`` copied row-major through column blocks: one pass whose reads
    stay within ``TRANSPOSE_BLOCK`` memory rows at a time.

    MLX's copy of a whole transposed array reads every element of an output row from a
    different memory row (and page); blocked, those reads stay in cache and TLB. Measured
    on the 2-core Xeon (``benchmarks/grad_layout_probe.py --dims 1568,2048,3000,5000``):
    2048² 48.4 -> 13.7 ms, 3000² 116 -> 55 ms, 5000² 352 -> 162 ms; no change at 1568²
    (9.8 ms) and a little slower below 2^21 elements in a scratch sweep, hence
    ``BLOCKED_MIN_ELEMS``.
    """
    b = TRANSPOSE_BLOCK
    return mx.concatenate([leaf[:, c : c + b] for c in range(0, leaf.shape[1], b)], axis=1)


def _dtypes_in_order(leaves):
    seen = []
    for _, v in leaves:
        if v.dtype not in seen:
            seen.append(v.dtype)
    return seen
