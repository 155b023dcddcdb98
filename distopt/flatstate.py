"""Optimizer state as flat per-dtype buffers, and re-sharding it to any world size.

Whatever the world size, a checkpoint stores the optimizer state the same way: for
every dtype buffer of the flat layout and every state key (``"m"``, ``"v"``,
``"master"``, ...), the flat buffer cut into the saving ranks' shards. Top-level arrays
other than the shards (``step``, ``learning_rate``, a loss scale, ...) are *globals*.

- A sharded optimizer (N > 1) already holds its state that way.
- A single-process optimizer holds it in the ``mlx.optimizers`` layout (one dict of
  keys per parameter); :func:`from_mlx_layout` lays it end to end as one shard.

Loading computes, for every position of the new shard, where it lies in the saved
shards (:func:`copy_runs`) and copies those slices; padding becomes zeros.
"""

import bisect

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .layout import FlatLayout, dtype_name, join
from .manifest import CheckpointError

ONE_BUCKET = 2**62  # bucket_bytes that puts a whole buffer in one bucket


def describe_buffer(buf, keys):
    """The manifest entry of a :class:`~distopt.layout.Buffer` whose state has ``keys`` ({key: dtype})."""
    return {
        "size": buf.size,
        "padded_size": buf.padded_size,
        "entries": [[e.path, list(e.shape), e.offset] for e in buf.entries],
        "buckets": [[b.start, b.stop, list(b.counts)] for b in buf.buckets],
        "keys": dict(keys),
    }


def global_arrays(state):
    """The *globals* of a sharded optimizer's state: its top-level arrays outside ``"shards"``, flat."""
    rest = {k: v for k, v in state.items() if k != "shards"}
    return {k: v for k, v in tree_flatten(rest) if isinstance(v, mx.array)}


def from_mlx_layout(state, parameters):
    """``(globals, shards, buffers)`` of an ``mlx.optimizers`` state as one flat shard.

    Args:
        state (dict): the optimizer's state (``step``, ``learning_rate`` and one dict of
          arrays per parameter, nested like the parameters).
        parameters (dict): flat ``{path: array}`` of the model's parameters.

    The buffers hold the parameters that have state, in the model's order; a state
    array that sits under no parameter path is a global.
    """
    per_param, globals_ = {}, {}
    for key, value in tree_flatten(state):
        if not isinstance(value, mx.array):
            continue  # not an array: nothing a safetensors file can hold
        path, name = _owner(key, parameters)
        if path is None:
            globals_[key] = value
        else:
            per_param.setdefault(path, {})[name] = value
    optimized = [(p, parameters[p]) for p in parameters if p in per_param]
    if not optimized:
        return globals_, {}, {}
    layout = FlatLayout(tree_unflatten(optimized), 1, ONE_BUCKET)
    shards, buffers = {}, {}
    for name, buf in layout.buffers.items():
        keys = _common_keys(buf, per_param)
        shards[name] = {k: join([per_param[e.path][k].reshape(-1) for e in buf.entries]) for k in keys}
        buffers[name] = describe_buffer(buf, keys)
    return globals_, shards, buffers


def _owner(key, parameters):
    """(parameter path, state key) for a flat state key, or (None, None) for a global."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:i])
        if path in parameters:
            return path, ".".join(parts[i:])
    return None, None


def _common_keys(buf, per_param):
    """{key: dtype} shared by every parameter of ``buf``; a CheckpointError if they differ."""
    first = buf.entries[0].path
    keys = {k: dtype_name(v.dtype) for k, v in per_param[first].items()}
    for e in buf.entries:
        theirs = {k: dtype_name(v.dtype) for k, v in per_param[e.path].items()}
        if theirs != keys:
            raise CheckpointError(
                f"The optimizer state of '{e.path}' has keys {theirs} but that of '{first}' has {keys}; "
                "every parameter of one dtype must have the same state to be saved."
            )
    return keys


class SavedBuffer:
    """A saved dtype buffer: find any flat position in the saved shards."""

    def __init__(self, desc):
        self.desc = desc
        self.offsets = {path: (offset, shape) for path, shape, offset in desc["entries"]}
        self.bucket_starts = [b[0] for b in desc["buckets"]]
        self.num_shards = len(desc["buckets"][0][2]) if desc["buckets"] else 0
        self.base = []  # base[b][r]: where bucket b's part starts in rank r's shard
        totals = [0] * self.num_shards
        for _, _, counts in desc["buckets"]:
            self.base.append(list(totals))
            totals = [t + c for t, c in zip(totals, counts)]
        self.shard_sizes = totals

    def locate(self, pos, length):
        """Runs ``(rank, position in that rank's shard, n)`` holding ``flat[pos : pos + length]``."""
        runs = []
        while length > 0:
            b = bisect.bisect_right(self.bucket_starts, pos) - 1
            start, stop, counts = self.desc["buckets"][b]
            lo = start
            for rank, count in enumerate(counts):
                if pos < lo + count:
                    n = min(length, lo + count - pos)
                    runs.append((rank, self.base[b][rank] + pos - lo, n))
                    pos, length = pos + n, length - n
                    break
                lo += count
            else:
                raise CheckpointError(f"Flat position {pos} lies in no saved shard.")
        return runs


def copy_runs(saved, pieces):
    """Runs ``(rank or None, position, n)`` that build a new flat shard from the saved shards.

    Args:
        saved (SavedBuffer): the saved buffer.
        pieces: ``(path, begin, n)`` for ``n`` elements of a parameter from flat
          position ``begin`` within it, or ``(None, 0, n)`` for ``n`` zeros of padding.

    Adjacent runs of one saved rank are merged, so a new shard that lies inside one old
    shard is one slice.
    """
    runs = []
    for path, begin, n in pieces:
        found = [(None, 0, n)] if path is None else saved.locate(saved.offsets[path][0] + begin, n)
        for run in found:
            last = runs[-1] if runs else None
            if last and last[0] == run[0] and (run[0] is None or last[1] + last[2] == run[1]):
                runs[-1] = (last[0], last[1], last[2] + run[2])
            else:
                runs.append(run)
    return runs


def shard_pieces(buf, ranges):
    """``(path, begin, n)`` pieces of the flat ``ranges`` of a new layout's buffer ``buf``."""
    pieces = []
    for lo, hi in ranges:
        pos = lo
        for e in buf.entries:
            if e.offset + e.size <= pos or e.offset >= hi:
                continue
            end = min(hi, e.offset + e.size)
            pieces.append((e.path, pos - e.offset, end - pos))
            pos = end
        if hi > pos:
            pieces.append((None, 0, hi - pos))
    return pieces


def build(runs, sources, dtype):
    """The array the ``runs`` describe, sliced from ``sources[rank]`` (1-D arrays)."""
    parts = [mx.zeros((n,), dtype) if r is None else sources[r][p : p + n] for r, p, n in runs]
    if not parts:
        return mx.zeros((0,), dtype)
    return join(parts)
