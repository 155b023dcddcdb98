"""Evaluated MLX buffers that NumPy, MPI and sockets read and write in place.

``np.asarray`` of an evaluated MLX array is a writable view of its memory (no copy),
so a collective can read a gradient bucket and write its result straight into MLX
buffers. NumPy has no bfloat16: half precision travels as uint16 words.
"""

import mlx.core as mx
import numpy as np

HALF = {"float16": mx.float16, "bfloat16": mx.bfloat16}


def numpy_view(x):
    """A NumPy view (no copy) of evaluated ``x``; half-precision as an MLX uint16 view."""
    if x.dtype in HALF.values():
        x = x.view(mx.uint16)
    mx.eval(x)
    return np.asarray(x)


def receive_buffer(n, dtype):
    """An evaluated MLX buffer of ``n`` elements of ``dtype`` that MPI or a socket writes in
    place through ``np.asarray`` (half precision as uint16, as :func:`numpy_view` gives it)."""
    return receive_buffers([n], dtype)[0]


def receive_buffers(sizes, dtype):
    """:func:`receive_buffer` for each of ``sizes``, evaluated together (one evaluation
    instead of one per buffer: a model's new parameters are many small leaves)."""
    outs = [mx.zeros((n,), mx.uint16 if dtype in HALF.values() else dtype) for n in sizes]
    mx.eval(outs)
    return outs


def mlx_cache_limit():
    """MLX's buffer cache limit in bytes. MLX has no getter: ``mx.set_cache_limit`` returns
    the limit it replaces, so this sets a larger one for an instant and puts it back."""
    limit = mx.set_cache_limit(1 << 62)
    mx.set_cache_limit(limit)
    return limit


def as_dtype(out, dtype):
    """``out`` (from :func:`receive_buffer`) viewed as ``dtype``."""
    return out.view(dtype) if out.dtype != dtype else out
