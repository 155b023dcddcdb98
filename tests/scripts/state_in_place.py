"""Rank script: on the CPU a step writes the new optimizer state into the old state's memory.

Prints ``INPLACE {json}``: per optimizer, how many state arrays (every buffer, key and
bucket) kept their address from step 2 to step 3, out of how many.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import distopt


def addresses(opt):
    """``{(buffer, key, bucket): address of the array's memory}`` of this rank's state shards."""
    return {
        (name, key, b): np.asarray(part).__array_interface__["data"][0]
        for name, shard in opt.state["shards"].items()
        for key, parts in shard.items()
        for b, part in enumerate(parts)
    }


def main():
    group = distopt.init()
    results = {}
    small = {"bucket_bytes": 8192}  # several buckets
    optimizers = {
        "adamax": lambda: distopt.Adamax(1e-3, **small),
        "adagrad": lambda: distopt.Adagrad(1e-2, **small),
        "sgd_momentum": lambda: distopt.SGD(1e-2, momentum=0.9, **small),
    }
    for name, make in optimizers.items():
        mx.random.seed(0)
        model = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 40))
        opt = make()
        x = mx.random.normal((8, 96), key=mx.random.key(group.rank()))
        loss_and_grad = nn.value_and_grad(model, lambda m: m(x).square().mean())
        seen = []
        for _ in range(3):
            _, grads = loss_and_grad(model)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
            seen.append(addresses(opt))
        kept = sum(seen[1][k] == seen[2][k] for k in seen[2])
        results[name] = [kept, len(seen[2])]
    print("INPLACE " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
