"""Where a method's peak RSS comes from: the forward+backward or the optimizer step.

Run as ranks, one method per launch (a fresh process, as ``distopt bench`` gives each
method a fresh model)::

    distopt launch -n 2 --backend ring benchmarks/rss_phase_probe.py --method mlx_dp
    distopt launch -n 2 --backend ring benchmarks/rss_phase_probe.py --method distopt_s1

Builds the model of ``distopt bench`` (``--model``, ``--params``, the CPU batch shapes),
runs ``--steps`` steps as :class:`distopt.bench.ranks.MlxRun` does and prints, on rank 0,
per step and phase (``fb``: forward+backward, evaluated; ``opt``: reduction + update +
gather, evaluated): the RSS before the phase and its peak during it (Linux ``VmHWM``,
reset through ``/proc/self/clear_refs`` before each phase), and MLX's active memory
before and its peak during the phase (MLX's counter: its own buffers only, not the NumPy
scratch of the ``tcp`` ring), and the bytes in MLX's buffer cache after the phase. ``--lazy-loss`` leaves the loss unevaluated until after the update (mlx-lm's trainer). With ``--distopt-report`` it also prints the optimizer's
:meth:`memory_report` (the planned bytes of a step).
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

import distopt
from distopt.bench import ranks
from distopt.bench.models import mlx_model, parse_size
from distopt.buffers import mlx_cache_limit

MIB = 2**20


def rss_now():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def phase(run, name, fn, rows):
    """Run ``fn`` with the peak counters reset; record RSS and MLX memory around it."""
    before, active = rss_now(), mx.get_active_memory()
    ranks._reset_peaks()
    fn()
    peaks = ranks._peaks()
    rows.append((name, before, peaks["peak_rss"], active, peaks["peak_mlx"], rss_now(), mx.get_cache_memory()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True, choices=["mlx_dp", "distopt_s1", "distopt_s2"])
    p.add_argument("--model", default="transformer", choices=["mlp", "transformer"])
    p.add_argument("--params", default="100M")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--distopt-report", action="store_true")
    p.add_argument("--no-cache-step-buffers", action="store_true", help="distopt with cache_step_buffers=False (MLX's cache limit left alone)")
    p.add_argument("--lazy-loss", action="store_true", help="evaluate the loss after the update, as mlx-lm's trainer does (default: with the gradients, as distopt bench does)")
    args = p.parse_args()
    group = distopt.init()
    mx.set_default_device(mx.cpu)
    cfg = {"rank": group.rank(), "batch": 16, "lm_batch": 2, "seq": 64, "cache_limit": mlx_cache_limit()}
    run = ranks.MlxRun(args.method, args.model, parse_size(args.params), cfg, group)
    if args.no_cache_step_buffers and args.method != "mlx_dp":
        run.opt.cache_step_buffers = False  # read on the first step, which initializes the optimizer
    state = {}

    def fb():
        state["loss"], state["grads"] = run.grad_fn(run.model, *run.batch)
        mx.eval(state["grads"] if args.lazy_loss else (state["loss"], state["grads"]))

    def opt():
        grads = state.pop("grads")
        if args.method == "mlx_dp":
            grads = nn.average_gradients(grads, group=group)
        run.opt.update(run.model, grads)
        mx.eval(run.model.parameters(), run.opt.state, state.pop("loss"))  # grads live until here, as in the bench's step

    rows = []
    for step in range(args.steps):
        run.barrier()
        phase(run, f"{step} fb", fb, rows)
        run.barrier()
        phase(run, f"{step} opt", opt, rows)
    if group.rank() == 0:
        print(f"{args.method} {args.model} {args.params} N={group.size()} backend={distopt.group.backend_of(group)}  (MiB)")
        print(f"{'phase':8} {'RSS before':>11} {'RSS peak':>9} {'RSS after':>10} {'MLX before':>11} {'MLX peak':>9} {'MLX cache after':>16}")
        for name, before, peak, active, mlx_peak, after, cache in rows:
            print(f"{name:8} {before / MIB:11.0f} {peak / MIB:9.0f} {after / MIB:10.0f} {active / MIB:11.0f} {mlx_peak / MIB:9.0f} {cache / MIB:16.0f}")
        if args.distopt_report and args.method != "mlx_dp":
            for key, value in run.opt.memory_report().items():
                print(f"  {key}: {value / MIB:.0f} MiB" if key.endswith("bytes") else f"  {key}: {value}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
