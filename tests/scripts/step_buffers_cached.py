"""Rank script: the step's buffers come from MLX's cache, not fresh memory from the OS.

A 2-layer MLP of 4096 x 4096 float32 weights (64 MiB leaves, larger than glibc's
largest mmap threshold, so a freed leaf not kept by MLX goes back to the OS). Prints
``CACHE {json}`` per setting: MLX's cache limit before and after ``opt.init``, the
optimizer's ``step_buffer_bytes()``, and the minor page faults per step (mean of steps 3 and 4).
"""

import json
import resource

import mlx.core as mx
import mlx.nn as nn

import distopt
from distopt.buffers import mlx_cache_limit as cache_limit


def run(group, cache_step_buffers, limit):
    mx.clear_cache()
    mx.set_cache_limit(limit)  # what the user set, or MLX's default
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096))
    x = mx.random.normal((4, 4096), key=mx.random.key(group.rank()))
    loss_and_grad = nn.value_and_grad(model, lambda m: m(x).square().mean())
    opt = distopt.Adamax(1e-3, cache_step_buffers=cache_step_buffers)
    before = cache_limit()
    opt.init(model.trainable_parameters())
    after = cache_limit()
    faults = 0
    for step in range(4):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        _, grads = loss_and_grad(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        if step >= 2:
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
    return {"before": before, "after": after, "step_buffer_bytes": opt.step_buffer_bytes(), "faults": faults // 2}


def main():
    group = distopt.init()
    default = cache_limit()
    results = {
        "cached": run(group, True, default),
        "not_cached": run(group, False, default),
        "user_limit_kept": run(group, True, 8 << 30),
    }
    mx.set_cache_limit(default)
    print("CACHE " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
