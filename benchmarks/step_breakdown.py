"""Where a CPU distopt update goes: ``gpu_step_probe.py`` with each phase of the step timed.

Runs :mod:`gpu_step_probe` (same arguments) with timers around the evaluations and
socket calls of a step, and prints on rank 0, per step, the milliseconds spent in:

- ``flatten``: evaluating a bucket's gradient pieces (the flattening copies);
- ``receive buffers``: allocating the MLX buffers that sockets or MPI write into
  (the reduce-scatter results and, on ``tcp``, the new parameter arrays);
- ``socket exchanges`` / ``mpi exchanges`` and ``adds``: the ``tcp`` / ``mpi4py-ring``
  ring's send/receive steps and in-place sums;
- ``update``: evaluating the compiled optimizer update of this rank's part (with the
  parameter part it reads, and on ``tcp`` putting the reduced part back in row order);
- other evaluations, by caller.

Example (2 ranks, the 10M MLP of ``distopt bench``, MLX's default cache)::

    distopt launch -n 2 --backend ring benchmarks/step_breakdown.py --variant s1_keep \\
        --model mlp --params 1e7 --steps 8 --bucket-mb 256

The timers serialize nothing that the step does not already wait for on the CPU (every
timed call evaluates or blocks anyway), so their sum is close to ``opt_ms``.
"""

import atexit
import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_step_probe  # noqa: E402

from distopt import buffers, byte_ring, comm, layout, mpi_ring, sharded, tcp  # noqa: E402
from distopt import evaluation  # noqa: E402

spent = collections.defaultdict(list)
NAMES = {"reduce_scatter_pieces": "flatten", "_compiled": "flatten", "_transposed_and_large": "flatten", "gathers_into": "update"}


def timer(name, fn):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name].append(time.perf_counter() - start)

    return timed


def timed_traced(x, wait=True):
    caller = sys._getframe(1).f_code.co_name
    return timer(NAMES.get(caller, f"eval in {caller}"), evaluation.traced)(x, wait)


def numpy_view(x):
    start = time.perf_counter()
    import mlx.core as mx

    mx.eval(x)
    spent["update"].append(time.perf_counter() - start)  # the all-gather evaluates the updated part
    return buffers.numpy_view(x)


def report():
    if os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK")) != "0":
        return
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 8
    total = steps + 2  # gpu_step_probe runs two warm-up steps
    for name, times in sorted(spent.items(), key=lambda kv: -sum(kv[1])):
        steady = times[len(times) * 2 // total :]
        print(f"BREAKDOWN {name:28s} {1e3 * sum(steady) / steps:8.1f} ms/step  ({len(times) / total:.0f} calls/step)", flush=True)


for module in (comm, sharded, layout):
    module.traced = timed_traced
allocate = timer("receive buffers", buffers.receive_buffer)
comm.receive_buffer = byte_ring.receive_buffer = layout.receive_buffer = allocate
comm.numpy_view = byte_ring.numpy_view = numpy_view
tcp.TcpRing._step = timer("socket exchanges", tcp.TcpRing._step)
mpi_ring.MpiRing._step = timer("mpi exchanges", mpi_ring.MpiRing._step)
byte_ring._add_into = timer("adds", byte_ring._add_into)
atexit.register(report)

if __name__ == "__main__":
    gpu_step_probe.main()
