"""MLX's default cache limit on this device, and a one-rank sharded step with and without
``cache_step_buffers`` (``max_norm`` makes one rank take the flat sharded path).

    python3 benchmarks/cache_limit_probe.py      # prints JSON; on the GPU machine after source .gpu-b/setup.sh

``peak_gib`` is MLX's peak since the process began (not reset between the two runs).
"""

import json
import time

import mlx.core as mx, mlx.nn as nn
import distopt
out = {"device": str(mx.default_device())}
default = mx.set_cache_limit(1 << 62); mx.set_cache_limit(default)
out["default_cache_limit"] = default
out["memory_limit"] = mx.set_memory_limit(1 << 62); mx.set_memory_limit(out["memory_limit"])
mx.random.seed(0)
model = nn.Sequential(nn.Linear(8192, 8192), nn.ReLU(), nn.Linear(8192, 8192))
x = mx.random.normal((64, 8192))
lg = nn.value_and_grad(model, lambda m: m(x).square().mean())
for flag in (True, False):
    mx.set_cache_limit(default); mx.clear_cache()
    opt = distopt.Adamax(1e-4, max_norm=1.0, cache_step_buffers=flag)  # max_norm: the flat sharded path on one rank
    ts = []
    for i in range(8):
        t = time.perf_counter(); _, g = lg(model); mx.eval(g); t1 = time.perf_counter()
        opt.update(model, g); mx.eval(model.parameters(), opt.state); ts.append(time.perf_counter() - t1)
    lim = mx.set_cache_limit(default)
    out[f"cache_step_buffers={flag}"] = {"limit_after": lim, "step_buffer_bytes": opt.step_buffer_bytes(), "opt_ms_median": 1e3 * sorted(ts[3:])[len(ts[3:]) // 2], "peak_gib": mx.get_peak_memory() / 2**30}
print(json.dumps(out, indent=1))
