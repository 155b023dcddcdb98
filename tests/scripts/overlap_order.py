"""Rank script: the order in which a step reduces its buckets, with and without ``overlap_backward``.

Trains the same model from the same start for 3 steps with unevaluated gradients (the
usual MLX loop), once per setting, recording the first element (``bucket.start``) of
every bucket as the communicator reduces it. Prints ``ORDER {json}``: per setting, the
starts of the last step in call order and the bucket count, and whether both settings
end with bitwise the same parameters and optimizer state.
"""

import json

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import distopt

STEPS = 3


def recording(comm, seen):
    """Wrap ``comm``'s reduce-scatter entry points so each bucket reduced appends its start
    (once: one entry point may call the other)."""
    depth = [0]
    for name in ("reduce_scatter_segments", "reduce_scatter_pieces"):
        inner = getattr(comm, name)

        def wrapper(parts, bucket, inner=inner):
            if depth[0] == 0:
                seen.append(bucket.start)
            depth[0] += 1
            try:
                return inner(parts, bucket)
            finally:
                depth[0] -= 1

        setattr(comm, name, wrapper)


def train(group, overlap):
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    opt = distopt.Adamax(1e-2, bucket_bytes=1024, overlap_backward=overlap)
    opt.init(model.trainable_parameters())
    seen = []
    recording(opt.comm, seen)
    loss_and_grad = nn.value_and_grad(model, lambda m, x: m(x).square().mean())
    for step in range(STEPS):
        x = mx.random.normal((4, 24), key=mx.random.key(100 * step + group.rank()))
        seen.clear()
        _, grads = loss_and_grad(model, x)  # left unevaluated: the optimizer schedules them
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    return list(seen), opt.layout.bucket_count, model.parameters(), opt.consolidated_state()


def main():
    group = distopt.init()
    on, off = train(group, True), train(group, False)
    same = all(
        mx.array_equal(a, b).item()
        for tree in (2, 3)
        for (_, a), (_, b) in zip(tree_flatten(on[tree]), tree_flatten(off[tree]), strict=True)
    )
    print("ORDER " + json.dumps({"on": on[:2], "off": off[:2], "same_result": same}), flush=True)


if __name__ == "__main__":
    main()
