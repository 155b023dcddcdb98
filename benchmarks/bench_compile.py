"""Step time of a distopt training step: eager, gradient compiled, whole step compiled.

Run as ranks (each rank prints; rank 0's table is the result)::

    distopt launch -n 2 --backend ring benchmarks/bench_compile.py
    distopt launch -n 2 --backend mpi  benchmarks/bench_compile.py --layers 8 --width 512

Three ways to run the same step, for several optimizer configurations:

- ``eager``: ``value_and_grad`` and ``opt.update`` uncompiled.
- ``grad compiled``: ``mx.compile`` of the forward and backward only; the optimizer
  step (reduce-scatter, sharded update, gather) eager, on the backend's best
  reduce-scatter (send/recv ring, mpi4py).
- ``step compiled``: the whole step compiled with
  ``inputs=outputs=[model.state, opt.state]``, as mlx-lm does. Under ``mx.compile``
  the eager communication paths cannot run, so it reduces with ``all_sum`` + slice.

Each time is the median of ``--steps`` steps after ``--warmup`` steps, with an
``all_sum`` barrier before every step.
"""

import argparse
import statistics
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn

import distopt

CONFIGS = {
    "adamax fp32": (mx.float32, {}),
    "adamax bf16 master+clip+skip": (mx.bfloat16, dict(master_weights=True, max_norm=1.0, skip_nonfinite=True)),
}


MODES = ("eager", "grad compiled", "step compiled")


class MLP(nn.Module):
    def __init__(self, layers, width):
        super().__init__()
        self.layers = [nn.Linear(width, width) for _ in range(layers)]
        self.norms = [nn.RMSNorm(width) for _ in range(layers)]

    def __call__(self, x):
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(nn.gelu(norm(x)))
        return x


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x).astype(mx.float32), y)


def time_mode(mode, dtype, kwargs, args, group):
    mx.random.seed(0)
    model = MLP(args.layers, args.width)
    model.set_dtype(dtype)
    opt = distopt.Adamax(1e-3, group=group, **kwargs)
    opt.init(model.trainable_parameters())
    grad_fn = nn.value_and_grad(model, loss_fn)

    if mode == "grad compiled":
        compiled_grad = mx.compile(lambda x, y: grad_fn(model, x, y), inputs=model.state, outputs=model.state)

        def step(x, y):
            loss, grads = compiled_grad(x, y)
            opt.update(model, grads)
            return loss

    else:

        def step(x, y):
            loss, grads = grad_fn(model, x, y)
            opt.update(model, grads)
            return loss

        if mode == "step compiled":
            step = partial(mx.compile, inputs=[model.state, opt.state], outputs=[model.state, opt.state])(step)

    mx.random.seed(1 + group.rank())
    x = mx.random.normal((args.batch, args.width)).astype(dtype)
    y = mx.random.normal((args.batch, args.width))
    times = []
    for i in range(args.warmup + args.steps):
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
        start = time.perf_counter()
        loss = step(x, y)
        mx.eval(loss, model.parameters(), opt.state)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", default="eager,grad compiled,step compiled", help="comma-separated subset of the three modes")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is available")
    args = parser.parse_args()
    if args.cpu:
        mx.set_default_device(mx.cpu)
    group = distopt.init()
    params = args.layers * (args.width * args.width + 2 * args.width)
    if group.rank() == 0:
        print(f"{group.size()} ranks ({distopt.group.backend_of(group)}, {mx.default_device()}), {args.layers} residual layers of width {args.width} ({params / 1e6:.2f}M parameters), batch {args.batch}")
        print(f"{'configuration':<30}{'eager':>10}{'grad compiled':>15}{'step compiled':>15}{'speed-up':>10}")
    for name, (dtype, kwargs) in CONFIGS.items():
        ms = {mode: float("nan") for mode in MODES}
        ms.update({mode: 1e3 * time_mode(mode, dtype, kwargs, args, group)[0] for mode in args.modes.split(",")})
        if group.rank() == 0:
            speedup = ms["eager"] / ms["step compiled"]
            print(f"{name:<30}{ms['eager']:>8.2f}ms{ms['grad compiled']:>13.2f}ms{ms['step compiled']:>13.2f}ms{speedup:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
