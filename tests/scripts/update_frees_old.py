"""Rank script: ``opt.update(model, grads)`` hands each bucket's new parameters to the model.

An MLP of 16 Linear(512, 512) float32 layers (about 1 MiB per weight) with 1 MiB
buckets. Prints one ``FREES {json}`` line: MLX's memory beyond what the model, the
gradients and the state hold, at its peak during a step through ``update`` and through
``model.update(opt.apply_gradients(grads, model))`` (MLX's active memory before, its peak
counter during), the model's parameter bytes, ``memory_report()``, and whether both
paths give the same parameters bit for bit. Then one ``LISTS {json}`` line: a model
whose parameters are a plain list of arrays, stepped through ``update`` and through
``apply_gradients``, and the error for gradients the model does not have.
"""

import json

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import distopt


def mlp():
    mx.random.seed(0)
    return nn.Sequential(*[nn.Linear(512, 512) for _ in range(16)])


def peak_beyond(step, model, opt, grads):
    mx.eval(model.parameters(), grads, opt.state)
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    step(model, opt, grads)
    mx.eval(model.parameters(), opt.state)
    return mx.get_peak_memory() - before


def through_update(model, opt, grads):
    opt.update(model, grads)


def through_apply(model, opt, grads):
    model.update(opt.apply_gradients(grads, model))


def frees(group):
    x = mx.random.normal((4, 512), key=mx.random.key(group.rank()))
    results, params = {}, {}
    for name, step in (("update", through_update), ("apply", through_apply)):
        model = mlp()
        opt = distopt.Adamax(1e-3, group=group, bucket_bytes=1 << 20, cache_step_buffers=False)
        loss_and_grad = nn.value_and_grad(model, lambda m: m(x).square().mean())
        extra = []
        for _ in range(3):
            _, grads = loss_and_grad(model)
            extra.append(peak_beyond(step, model, opt, grads))
            del grads
        results[name] = max(extra[1:])  # steps 2 and 3: the state exists before the step
        params[name] = model.parameters()
    same = all(mx.array_equal(a, b).item() for (_, a), (_, b) in zip(tree_flatten(params["update"]), tree_flatten(params["apply"])))
    return {
        **results,
        "parameter_bytes": sum(v.nbytes for _, v in tree_flatten(params["update"])),
        "report": opt.memory_report(),
        "buckets": opt.layout.bucket_count,
        "same": same,
    }


class Listed(nn.Module):
    """Parameters in a plain list of arrays (not modules): ``w[0]``, ``w[1]``, ``w[2]``."""

    def __init__(self):
        super().__init__()
        self.w = [mx.full((300,), float(i + 1)) for i in range(3)]

    def __call__(self, x):
        return sum((x * w).sum() for w in self.w)


def lists(group):
    x = mx.random.normal((300,), key=mx.random.key(group.rank()))
    out = {}
    for name in ("update", "apply"):
        model = Listed()
        opt = distopt.SGD(0.1, group=group, bucket_bytes=1024)  # 1024 bytes: w[1] spans two buckets
        _, grads = nn.value_and_grad(model, lambda m: m(x))(model)
        if name == "update":
            opt.update(model, grads)
        else:
            model.update(opt.apply_gradients(grads, model))
        mx.eval(model.parameters())
        out[name] = [w.tolist() for w in model.w]
        out["types"] = [type(w).__name__ for w in model.w]
    try:
        opt.update(Listed(), {"w": grads["w"], "v": mx.zeros((3,))})
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    return out


def main():
    group = distopt.init()
    print("FREES " + json.dumps(frees(group)), flush=True)
    print("LISTS " + json.dumps(lists(group)), flush=True)


if __name__ == "__main__":
    main()
