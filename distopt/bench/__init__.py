"""Side-by-side benchmark: distopt against MLX data parallelism and PyTorch ZeRO.

Every method trains the same models (an MLP and a small decoder-only transformer at
about 1M, 10M, 100M parameters) on the same synthetic data with the same number of
ranks, each rank on its own batch of the same size:

- ``single``: one process, ``mlx.optimizers.Adamax`` (no distribution);
- ``mlx_dp``: ``mlx.nn.average_gradients`` + ``mlx.optimizers.Adamax`` (unsharded);
- ``distopt_s1`` / ``distopt_s2``: ``distopt.Adamax(stage=1|2)``;
- ``torch_zero``: PyTorch DDP + ``ZeroRedundancyOptimizer(torch.optim.Adamax)`` on gloo
  (CPU) or NCCL (GPU), when PyTorch is installed.

A step is timed as ``fb`` (this rank's forward and backward) plus ``opt`` (gradient
reduction + optimizer update + parameter gather). MLX methods evaluate the two parts
separately; PyTorch's DDP overlaps its all-reduce with the backward pass, so its ``opt``
is the median full step minus the median step run under ``no_sync`` (local forward and
backward only): step time minus that rank's own forward and backward, for every method.

Scaling model (``analytic_model``): for ``N`` machines on a ring with link bandwidth
``B`` (bytes/s) and per-message latency ``a``, a step of ``P`` float32 parameters takes

.. math::

    T(N) = T_{fb} + T_{upd}(P / N) + 2\frac{N-1}{N}\frac{4P}{B} + 2(N-1)a

for distopt (reduce-scatter + all-gather, update of one shard) and the same with
``T_upd(P)`` for MLX data parallelism (all-reduce, full update). ``T_upd(n) = 28n/U``
with ``U`` the measured update throughput (7 float32 arrays per element).

Run it with ``distopt bench`` (see ``distopt bench --help``) or ``python -m distopt.bench``.
"""

import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

from .launch import launch
from .models import METHODS, MLX_DIST_METHODS, MODELS, parse_size
from .ranks import worker_main
from .report import analytic_model, format_markdown, format_table, merge_ranks, plot, ratios
from .throughput import update_throughput

__all__ = ["main", "run_bench", "parser", "interleaves", "format_table", "format_markdown", "plot", "update_throughput"]


DEFAULT_SHAPES = {  # per device: MLP rows, transformer sequences and their length, per rank
    "cpu": {"batch": 16, "lm_batch": 2, "seq": 64},
    "gpu": {"batch": 256, "lm_batch": 8, "seq": 256},
}


def run_bench(opts, log=print, partial=None):
    """Run every method, model, size and rank count in ``opts``; return the result dict.

    ``partial(result)``, if given, receives the rows so far after every launch.
    """
    jobs = [(kind, parse_size(s)) for kind in opts.models for s in opts.sizes]
    jobs = [(kind, n) for kind, n in jobs if kind != "transformer" or n <= opts.lm_max]
    base = {"batch": opts.batch, "lm_batch": opts.lm_batch, "seq": opts.seq, "repeats": opts.repeats, "warmup": opts.warmup, "device": opts.device, "mlx_cache_gb": opts.mlx_cache_gb}
    methods = [m for m in opts.methods if m != "single"]
    torch_ok = "torch_zero" in methods and _has_torch()
    commit = _commit()  # the code the run starts with (a commit landing during a long run does not relabel it)
    rows, errors = [], []
    for n in sorted(set([1] + list(opts.ranks)) if "single" in opts.methods else opts.ranks):
        big = [j for j in jobs if j[1] <= opts.max_params.get(n, math.inf)]
        for kind, size in sorted(set(jobs) - set(big)):
            log(f"[bench] N={n}: {kind} {size / 1e6:g}M skipped: above --max-params {n}:{opts.max_params[n] / 1e6:g}M")
        if not big:
            continue
        mlx_methods = ["single"] if n == 1 else [m for m in methods if m in MLX_DIST_METHODS]
        runs = [("mlx", mlx_methods, opts.backend)] if mlx_methods else []
        runs += [("torch", ["torch_zero"], "torch")] if torch_ok and n > 1 else []
        for role, names, backend in runs:
            log(f"[bench] N={n}: {', '.join(names)} on {backend}, {len(big)} models")
            paired = [list(job) for job in big if interleaves(names, job[1], n, opts.device)]
            try:
                rows += merge_ranks(launch(n, role, {**base, "jobs": big, "methods": names, "interleave": paired}, backend, opts.timeout))
            except RuntimeError as e:  # report it and go on with the other methods
                log(f"[bench] N={n}: {', '.join(names)} FAILED: {e}")
                errors.append(f"N={n} {', '.join(names)}: {e}")
            if partial:
                partial({"meta": _meta(opts, torch_ok, commit), "rows": rows, "ratios": ratios(rows), "errors": errors})
    result = {"meta": _meta(opts, torch_ok, commit), "rows": rows, "ratios": ratios(rows), "errors": errors}
    if opts.throughput:
        log(f"[bench] update throughput on {opts.throughput} elements")
        result["throughput"] = update_throughput(opts.throughput, device=opts.device)
        result["model"] = analytic_model(rows, result["throughput"])
    return result


GPU_INTERLEAVE_MAX_PARAMS = 20_000_000  # on a GPU, larger models run one method after another


def interleaves(methods, params, n, device):
    """Whether the MLX ``methods`` on a model of ``params`` float32 parameters can be timed
    rep by rep in turn (every method's model alive at once) by ``n`` ranks on this host.

    On the CPU: when their estimated bytes fit in half the memory the host has available.
    Each method holds its parameters and state (MLX DP: 3 copies of the model; distopt:
    1 + 2/N), and the one stepping adds its gradients, new parameters and buffers (3 more).
    On a GPU (its memory unknown here), up to :data:`GPU_INTERLEAVE_MAX_PARAMS`.
    """
    if len(methods) < 2:
        return False
    if device == "gpu":
        return params <= GPU_INTERLEAVE_MAX_PARAMS
    copies = sum(3 if m == "mlx_dp" else 1 + 2 / n for m in methods) + 3
    return n * copies * 4 * params <= 0.5 * host_memory_available()


def host_memory_available():
    """Bytes of memory this host has available (Linux ``MemAvailable``; else all of it)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _has_torch():
    try:
        import torch.distributed  # noqa: F401

        return True
    except ImportError:
        return False


def _meta(opts, torch_ok, commit):
    """The run's context: ``date`` and ``load_average`` when it ended, ``commit`` when it began."""
    import mlx.core as mx

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {_cpu_name()}",
        "commit": commit,
        "mlx": mx.__version__,
        "backend": opts.backend,
        "device": opts.device,
        "mlp_batch": opts.batch,
        "lm_batch": opts.lm_batch,
        "seq": opts.seq,
        "repeats": opts.repeats,
        "mlx_cache_limit_gb": opts.mlx_cache_gb,
        "load_average": [round(x, 1) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "peak_memory": "device peak (mx.get_peak_memory / torch.cuda.max_memory_allocated)" if opts.device == "gpu"
        else "process peak RSS (VmHWM, reset before the timed steps)",
    }  # fmt: skip
    if torch_ok:
        import torch

        meta["torch"] = torch.__version__
    return meta


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit():
    if os.environ.get("DISTOPT_COMMIT"):
        return os.environ["DISTOPT_COMMIT"]  # a copy of the tree without .git (the GPU machine)
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return (out.stdout.strip() or "unknown") + ("-dirty" if changed.stdout.strip() else "")  # tracked files edited since
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def parser():
    """Arguments of ``distopt bench`` / ``python -m distopt.bench``."""
    p = argparse.ArgumentParser(prog="distopt bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,transformer", help="mlp, transformer (comma separated)")
    p.add_argument("--sizes", default="1M,10M,100M", help="parameter counts, e.g. 1M,10M,100M")
    p.add_argument("--ranks", default="2,4", help="rank counts for the distributed methods")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    p.add_argument("--max-params", default="4:20M,8:20M", help="largest size per rank count, e.g. 4:20M")
    p.add_argument("--lm-max", default=None, help="largest transformer size (default 20M on CPU: the 100M one takes ~10 s a step on 2 cores)")
    p.add_argument("--backend", default="ring", choices=("ring", "mpi", "nccl"))
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--batch", type=int, default=None, help="MLP rows per rank (default 16 on CPU, 256 on GPU)")
    p.add_argument("--lm-batch", type=int, default=None, help="transformer sequences per rank (default 2 on CPU, 8 on GPU)")
    p.add_argument("--seq", type=int, default=None, help="transformer sequence length (default 64 on CPU, 256 on GPU)")
    p.add_argument(
        "--mlx-cache-gb", type=float, default=None,
        help="mx.set_cache_limit for every MLX method, in GiB (MLX's CPU default keeps 32 MiB of freed buffers; on a Mac the limit is the memory limit)",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--throughput", type=str, default="16M", help="elements for the update-throughput test; 0 to skip")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per launch")
    p.add_argument("--json", dest="json_path", default=None, help="write the result as JSON here ('-' for stdout)")
    p.add_argument("--plot", dest="plot_path", default=None, help="write a chart here (needs matplotlib)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def resolve(opts):
    """Check and normalize parsed arguments; raises ValueError naming the problem."""
    opts.models = [m for m in opts.models.split(",") if m]
    bad = [m for m in opts.models if m not in MODELS]
    if bad:
        raise ValueError(f"Unknown model {bad[0]!r}; choose from {', '.join(MODELS)}.")
    opts.sizes = [s for s in opts.sizes.split(",") if s]
    for s in opts.sizes:
        parse_size(s)
    opts.ranks = [int(n) for n in opts.ranks.split(",") if n]
    if any(n < 2 for n in opts.ranks):
        raise ValueError("--ranks takes rank counts of 2 or more (N=1 is the 'single' method).")
    opts.methods = [m for m in opts.methods.split(",") if m]
    bad = [m for m in opts.methods if m not in METHODS]
    if bad:
        raise ValueError(f"Unknown method {bad[0]!r}; choose from {', '.join(METHODS)}.")
    opts.max_params = {int(k): parse_size(v) for k, v in (item.split(":") for item in opts.max_params.split(",") if item)}
    opts.throughput = parse_size(opts.throughput)
    opts.lm_max = parse_size(opts.lm_max) if opts.lm_max else (math.inf if opts.device == "gpu" else 20_000_000)
    for key, value in DEFAULT_SHAPES[opts.device].items():
        setattr(opts, key, getattr(opts, key) or value)
    if opts.backend == "nccl" and opts.device != "gpu":
        raise ValueError("--backend nccl needs --device gpu.")
    return opts


def main(argv=None):
    """Entry point of ``python -m distopt.bench`` (see ``--help``); returns the exit code."""
    opts = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that running ranks are stopped too
    if opts.worker:
        return worker_main(opts.worker)
    try:
        opts = resolve(opts)
    except ValueError as e:
        raise SystemExit(f"distopt bench: {e}")
    save = None
    if opts.json_path and opts.json_path != "-":
        save = lambda result: Path(opts.json_path).write_text(json.dumps(result, indent=1))  # noqa: E731
    result = run_bench(opts, log=lambda s: print(s, file=sys.stderr, flush=True), partial=save)
    print(format_table(result), flush=True)
    if opts.json_path == "-":
        print(json.dumps(result, indent=1))
    elif opts.json_path:
        Path(opts.json_path).write_text(json.dumps(result, indent=1))
    if opts.plot_path:
        plot(result, opts.plot_path)
    return result
