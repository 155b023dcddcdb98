"""The Adamax update as memory traffic: eager, compiled (distopt's shard kernel), a compiled copy."""

import statistics
import time

BYTES_PER_ELEMENT_ADAMAX = 28  # read p, g, m, v and write p, m, v: 7 float32 arrays


def update_throughput(elements, repeats=10, device=None):
    """GB/s of the Adamax update on flat float32 arrays: eager, compiled, and a compiled copy.

    ``compiled`` is the kernel distopt runs on each rank's shard on a GPU (MLX's own
    ``Adamax.apply_single`` under ``mx.compile``; on the CPU distopt compiles one kernel
    per output instead, see ``ShardedOptimizer._update``). The reference ``copy`` is a compiled
    element-wise kernel over the same 7 arrays (reads p, g, m, v; writes 3 sums), so all
    three move ``28 * elements`` bytes per call.
    """
    import mlx.core as mx
    import mlx.optimizers as optim

    if device == "cpu":
        mx.set_default_device(mx.cpu)
    p, g, m, v = (mx.random.normal((elements,)) for _ in range(4))
    v = mx.abs(v)
    mx.eval(p, g, m, v)
    adamax = optim.Adamax(1e-4)

    def update(g, p, m, v):
        state = {"m": m, "v": v}
        out = adamax.apply_single(g, p, state)
        return out, state["m"], state["v"]

    kernels = {"eager": update, "compiled": mx.compile(update), "copy": mx.compile(lambda g, p, m, v: (p + g, m + g, v + g))}
    result = {"elements": elements, "bytes_per_call": BYTES_PER_ELEMENT_ADAMAX * elements, "device": str(mx.default_device())}
    for name, fn in kernels.items():
        times = []
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            mx.eval(fn(g, p, m, v))
            if i >= 2:
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        result[f"{name}_ms"] = 1e3 * t
        result[f"{name}_gbps"] = BYTES_PER_ELEMENT_ADAMAX * elements / t / 1e9
    return result
