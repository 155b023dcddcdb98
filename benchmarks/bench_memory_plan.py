"""Planned against measured memory of a distopt step, per rank.

Run as ranks::

    distopt launch -n 2 --backend ring benchmarks/bench_memory_plan.py
    distopt launch -n 2 --backend ring benchmarks/bench_memory_plan.py --stage 2 --master-weights

Builds a stack of ``--layers`` Linear(width, width) layers (fp32, or bf16 with
``--master-weights``), runs three Adamax steps and prints, on rank 0, MLX's active
memory between steps and its peak during the last step (``mx.get_peak_memory``)
next to :func:`distopt.plan`'s figures for the same model. The batch is tiny, so
activations are negligible.
"""

import argparse

import mlx.core as mx
import mlx.nn as nn

import distopt
from distopt.group import backend_of


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--stage", type=int, default=1, choices=[1, 2])
    parser.add_argument("--master-weights", action="store_true")
    parser.add_argument("--bucket-mb", type=float, default=4)
    args = parser.parse_args()
    group = distopt.init()
    dtype = mx.bfloat16 if args.master_weights else mx.float32
    bucket_bytes = int(args.bucket_mb * 2**20)
    mx.random.seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    model.set_dtype(dtype)
    opt = distopt.Adamax(1e-3, stage=args.stage, master_weights=args.master_weights, bucket_bytes=bucket_bytes)
    opt.init(model.trainable_parameters())
    x = mx.random.normal((4, args.width)).astype(dtype)
    loss_and_grad = nn.value_and_grad(model, lambda m: m(x).astype(mx.float32).square().mean())
    for _ in range(3):
        mx.eval(model.parameters(), opt.state)
        mx.clear_cache()
        mx.reset_peak_memory()
        between = mx.get_active_memory()
        loss, grads = loss_and_grad(model)
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        peak = mx.get_peak_memory()
        del loss, grads
    planned = distopt.plan(
        model, opt, world_size=group.size(), master_weights=args.master_weights, bucket_bytes=bucket_bytes,
        backend=backend_of(group),
    )["stages"][args.stage]
    held = planned["parameter_bytes"] + planned["master_weight_bytes"] + planned["optimizer_state_bytes"]
    if group.rank() == 0:
        mib = 2**20
        print(
            f"{group.size()} ranks, stage {args.stage}, {'bf16 + master' if args.master_weights else 'fp32'}, "
            f"{args.layers}x{args.width}x{args.width}: between steps {between / mib:.1f} MiB measured, "
            f"{held / mib:.1f} planned (parameters + master + state); step peak {peak / mib:.1f} MiB measured, "
            f"{planned['total_bytes'] / mib:.1f} planned"
        )


if __name__ == "__main__":
    main()
