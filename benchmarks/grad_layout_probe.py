"""What flattening MLX's gradients costs: the weight gradient of ``nn.Linear`` is a transposed array.

``nn.Linear`` computes ``x @ W.T``; MLX's vjp returns ``dW`` as the transpose of a
contiguous ``x.T @ dy``, so ``dW.reshape(-1)`` (what every flat-buffer method does: a
ZeRO bucket, ``nn.average_gradients``) is a strided copy, not a view. This script times,
on the default device, for one ``d x d`` Linear layer: that flattening copy of the real
gradient, a plain copy of a contiguous array of the same bytes, and ``dW.T.reshape(-1)``
(the gradient in its own memory order: a view), and on the CPU distopt's copy through
column blocks (``distopt.layout._transpose_by_blocks``, used from 2^21 elements on)::

    python benchmarks/grad_layout_probe.py --dims 1568        # 9.8 MB, the 10M MLP's layers
    python benchmarks/grad_layout_probe.py --dims 1568,2048,3000,5000   # several sizes, CPU
    python benchmarks/grad_layout_probe.py --dims 8192        # 268 MB, on a GPU
"""

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

from distopt.layout import _transpose_by_blocks


def timed(fn, reps):
    out = []
    for _ in range(reps):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        out.append(time.perf_counter() - start)
    return 1e3 * statistics.median(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", default="1568", help="comma-separated widths d of a d x d layer")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=9)
    a = p.parse_args()
    for dims in (int(d) for d in a.dims.split(",")):
        probe(dims, a.batch, a.reps)


def probe(dims, batch, reps):
    layer = nn.Linear(dims, dims, bias=False)
    x = mx.random.normal((batch, dims))
    _, grads = nn.value_and_grad(layer, lambda m: m(x).square().mean())(layer)
    g = grads["weight"]
    plain = mx.random.normal(g.shape)
    mx.eval(g, plain)
    flatten = timed(lambda: g.reshape(-1) + 0, reps)  # + 0: a copy even where reshape is a view
    copy = timed(lambda: plain.reshape(-1) + 0, reps)
    own_order = timed(lambda: g.T.reshape(-1) + 0, reps)
    mb = g.nbytes / 1e6
    print(f"device {mx.default_device()}, Linear {dims}x{dims} weight gradient, {mb:.1f} MB, median of {reps}")
    print(f"  dW.reshape(-1) copy       {flatten:8.3f} ms  {2 * mb / flatten:8.1f} GB/s")
    print(f"  contiguous copy           {copy:8.3f} ms  {2 * mb / copy:8.1f} GB/s")
    print(f"  dW.T.reshape(-1) copy     {own_order:8.3f} ms  {2 * mb / own_order:8.1f} GB/s")
    if mx.default_device() == mx.cpu:
        blocked = timed(lambda: _transpose_by_blocks(g).reshape(-1), reps)
        print(f"  by column blocks (CPU)    {blocked:8.3f} ms  {2 * mb / blocked:8.1f} GB/s")
    print(f"  flattening dW / plain copy = {flatten / copy:.2f}")


if __name__ == "__main__":
    main()
