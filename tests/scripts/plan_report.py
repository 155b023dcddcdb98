"""Rank script: distopt.plan(model, ...) against memory_report() of the same training run.

Prints one ``PLAN {json}`` line per configuration with both dicts of byte counts.
"""

import json

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import distopt
from distopt.group import backend_of


class Mixed(nn.Module):
    """A bf16 body with an fp32 head: two dtype buffers, odd sizes (padding)."""

    def __init__(self):
        super().__init__()
        self.body = [nn.Linear(33, 65), nn.Linear(65, 17)]
        self.head = nn.Linear(17, 3)
        for layer in self.body:
            layer.set_dtype(mx.bfloat16)

    def __call__(self, x):
        for layer in self.body:
            x = nn.relu(layer(x))
        return self.head(x.astype(mx.float32))


CONFIGS = [
    ("adamax", 1, dict()),
    ("adamax", 2, dict(master_weights=True, bucket_bytes=512)),
    ("sgd", 1, dict(master_weights=True, reduce_dtype=mx.float32, max_norm=1.0)),
    ("adagrad", 2, dict(skip_nonfinite=True, bucket_bytes=1000)),
    ("adamax", 1, dict(master_weights=True, shard_weights=[1, 3], bucket_bytes=700)),
]
CLASSES = {"adamax": distopt.Adamax, "sgd": distopt.SGD, "adagrad": distopt.Adagrad}


def nbytes(tree):
    return sum(v.nbytes for _, v in tree_flatten(tree))


def main():
    group = distopt.init()
    for name, stage, kwargs in CONFIGS:
        mx.random.seed(0)
        model = Mixed()
        opt = CLASSES[name](0.01, group=group, stage=stage, **kwargs)
        x = mx.random.normal((4, 33)).astype(mx.bfloat16)
        _, grads = nn.value_and_grad(model, lambda m: m(x).square().mean())(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        report = opt.memory_report()
        planned = distopt.plan(model, opt, world_size=group.size(), memory_gb=[1, 1e-6], backend=backend_of(group), **kwargs)
        print("PLAN " + json.dumps({
            "config": f"{name} stage {stage} {sorted(kwargs)}", "rank": group.rank(), "stage": stage,
            "report": {k: v for k, v in report.items()},
            "plan": planned["stages"][stage]["ranks"][group.rank()],
            "fits": planned["stages"][stage]["fits"],
            "arrays": {
                "parameters": nbytes(model.parameters()), "gradients": nbytes(grads), "state": nbytes(opt.state),
            },
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
