"""What flattening MLX's gradients costs: the weight gradient of ``nn.Linear`` is a transposed array.

``nn.Linear`` computes ``x @ W.T``; MLX's vjp returns ``dW`` as the transpose of a
contiguous ``x.T @ dy``, so ``dW.reshape(-1)`` (what every flat-buffer method does: a
ZeRO bucket, ``nn.average_gradients``) is a strided copy, not a view. This script times,
on the default device, for one ``d x d`` Linear layer: that flattening copy of the real
gradient, a plain copy of a contiguous array of the same bytes, and ``dW.T.reshape(-1)``
(the gradient in its own memory order: a view)::

    python benchmarks/grad_layout_probe.py --dims 1568        # 9.8 MB, the 10M MLP's layers
    python benchmarks/grad_layout_probe.py --dims 8192        # 268 MB, on a GPU
"""

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn


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
    p.add_argument("--dims", type=int, default=1568)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=9)
    a = p.parse_args()
    layer = nn.Linear(a.dims, a.dims, bias=False)
    x = mx.random.normal((a.batch, a.dims))
    _, grads = nn.value_and_grad(layer, lambda m: m(x).square().mean())(layer)
    g = grads["weight"]
    plain = mx.random.normal(g.shape)
    mx.eval(g, plain)
    flatten = timed(lambda: g.reshape(-1) + 0, a.reps)  # + 0: a copy even where reshape is a view
    copy = timed(lambda: plain.reshape(-1) + 0, a.reps)
    own_order = timed(lambda: g.T.reshape(-1) + 0, a.reps)
    mb = g.nbytes / 1e6
    print(f"device {mx.default_device()}, Linear {a.dims}x{a.dims} weight gradient, {mb:.1f} MB, median of {a.reps}")
    print(f"  dW.reshape(-1) copy       {flatten:8.3f} ms  {2 * mb / flatten:8.1f} GB/s")
    print(f"  contiguous copy           {copy:8.3f} ms  {2 * mb / copy:8.1f} GB/s")
    print(f"  dW.T.reshape(-1) copy     {own_order:8.3f} ms  {2 * mb / own_order:8.1f} GB/s")
    print(f"  flattening dW / plain copy = {flatten / copy:.2f}")


if __name__ == "__main__":
    main()
