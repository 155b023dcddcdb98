"""MLX's default cache limit on this device, and a one-rank sharded step with and without
``cache_step_buffers`` (``max_norm`` makes one rank take the flat sharded path).

    python3 benchmarks/cache_limit_probe.py      # prints JSON; on the GPU machine after source .gpu-b/setup.sh

``peak_gib`` is MLX's peak since the process began (not reset between the two runs).
"""

import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

import distopt
from distopt.buffers import mlx_cache_limit


def median_update_ms(cache_step_buffers, steps=8, skip=3):
    """Median milliseconds of ``opt.update`` (evaluated) over the steps after ``skip``."""
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(8192, 8192), nn.ReLU(), nn.Linear(8192, 8192))
    x = mx.random.normal((64, 8192))
    loss_and_grad = nn.value_and_grad(model, lambda m: m(x).square().mean())
    opt = distopt.Adamax(1e-4, max_norm=1.0, cache_step_buffers=cache_step_buffers)
    times = []
    for _ in range(steps):
        _, grads = loss_and_grad(model)
        mx.eval(grads)
        start = time.perf_counter()
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[skip:]), opt.step_buffer_bytes()


def main():
    default = mlx_cache_limit()
    memory_limit = mx.set_memory_limit(1 << 62)  # no getter either
    mx.set_memory_limit(memory_limit)
    out = {"device": str(mx.default_device()), "default_cache_limit": default, "memory_limit": memory_limit}
    for flag in (True, False):
        mx.set_cache_limit(default)
        mx.clear_cache()
        ms, need = median_update_ms(flag)
        out[f"cache_step_buffers={flag}"] = {
            "limit_after": mlx_cache_limit(), "step_buffer_bytes": need,
            "opt_ms_median": ms, "peak_gib": mx.get_peak_memory() / 2**30,
        }  # fmt: skip
    mx.set_cache_limit(default)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
