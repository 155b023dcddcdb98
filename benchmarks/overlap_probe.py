"""Whole training steps with unevaluated gradients: does distopt overlap reduction with backward?

The usual MLX loop hands ``value_and_grad``'s gradients to the optimizer unevaluated.
This rank script times that whole step (barrier, forward, backward, reduction, update,
gather, all evaluated) for, rep by rep in turn (the first one rotating):

- ``mlx_dp``: ``nn.average_gradients`` + ``mlx.optimizers.Adamax`` (what MLX users run);
- ``off``: ``distopt.Adamax(overlap_backward=False)``: buckets in layout order;
- ``on``: ``distopt.Adamax()`` (``overlap_backward=True``): the last bucket first, every
  bucket's gradients scheduled before the first is reduced;
- ``default``: ``distopt.Adamax()`` with every default (256 MiB buckets: models up to 64M
  float32 parameters are one bucket, reduced once the whole backward pass is done);
- ``local``: forward + backward alone, evaluated, no communication (the floor).

Rank 0 prints each variant's median step and spread, and the paired per-repeat ratios
``on/off``, ``on/mlx_dp``, ``on/default`` ... with a 90% interval (:mod:`distopt.bench.stats`):

    distopt launch -n 2 benchmarks/overlap_probe.py --params 1e7 --bucket-mb 4
    distopt launch -n 2 --backend mpi benchmarks/overlap_probe.py --params 1e7 --bucket-mb 4

Across network namespaces with shaped links (root; ``--rate`` e.g. ``1gbit``), run
from the repository root:

    python benchmarks/overlap_probe.py --netns 2 --rate 1gbit --params 1e7 --bucket-mb 4
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("mlx_dp", "off", "on", "default", "local")


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", choices=("mlp", "transformer"))
    p.add_argument("--params", type=float, default=1e7)
    p.add_argument("--bucket-mb", type=float, default=4.0, help="distopt's bucket_bytes, in MiB")
    p.add_argument("--batch", type=int, default=16, help="MLP rows per rank")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cpu", action="store_true", help="compute on the CPU (MLX's CUDA build defaults to the GPU)")
    p.add_argument("--netns", type=int, default=0, help="launch this many ranks, one per network namespace")
    p.add_argument("--rate", default=None, help="with --netns: shape every link to this tc rate")
    return p.parse_args()


class Variant:
    """One way of training the same model on this rank."""

    def __init__(self, name, args, group):
        import mlx.nn as nn
        import mlx.optimizers as optim

        import distopt
        from distopt.bench import DEFAULT_SHAPES
        from distopt.bench.models import mlx_model

        cfg = {"rank": group.rank(), **DEFAULT_SHAPES["cpu"], "batch": args.batch}  # distopt bench's CPU shapes
        self.name, self.group = name, group
        self.model, loss_fn, self.batch = mlx_model(args.model, int(args.params), cfg)
        self.grad_fn = nn.value_and_grad(self.model, loss_fn)
        if name == "mlx_dp":
            self.opt = optim.Adamax(1e-4)
        elif name in ("on", "off"):
            self.opt = distopt.Adamax(1e-4, group=group, bucket_bytes=int(args.bucket_mb * 2**20), overlap_backward=name == "on")
        elif name == "default":
            self.opt = distopt.Adamax(1e-4, group=group)
        self.times = []

    def step(self, record):
        import mlx.core as mx
        import mlx.nn as nn

        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))  # start together
        start = time.perf_counter()
        loss, grads = self.grad_fn(self.model, *self.batch)
        if self.name == "local":
            mx.eval(loss, grads)
        else:
            if self.name == "mlx_dp":
                grads = nn.average_gradients(grads, group=self.group)
            self.opt.update(self.model, grads)  # gradients unevaluated, as in the usual MLX loop
            mx.eval(loss, self.model.parameters(), self.opt.state)
        if record:
            self.times.append(1e3 * (time.perf_counter() - start))


def rank_main(args):
    import mlx.core as mx

    import distopt
    from distopt.bench.stats import paired_ratio
    from distopt.buffers import mlx_cache_limit

    if args.cpu:
        mx.set_default_device(mx.cpu)
    group = distopt.init()
    mx.set_cache_limit(max(mlx_cache_limit(), 1 << 30))  # as distopt raises its own: no fresh pages for any variant
    runs = [Variant(name, args, group) for name in VARIANTS]
    for i in range(args.warmup + args.repeats):
        for run in runs[i % len(runs) :] + runs[: i % len(runs)]:
            run.step(record=i >= args.warmup)
    if group.rank() != 0:
        return
    t = {run.name: run.times for run in runs}
    nbuckets = runs[VARIANTS.index("on")].opt.layout.bucket_count
    print(f"overlap probe: {args.model} {args.params:g} params, {mx.default_device()}, {os.cpu_count()} cores, N={group.size()}, {nbuckets} buckets of {args.bucket_mb:g} MiB, "
          f"path {runs[VARIANTS.index('on')].opt.comm.name}, {args.repeats} repeats")
    for name in VARIANTS:
        print(f"  {name:7} step median {statistics.median(t[name]):8.1f} ms  (min {min(t[name]):.1f}, max {max(t[name]):.1f})")
    for ours, theirs in (("on", "off"), ("on", "mlx_dp"), ("off", "mlx_dp"), ("on", "default"), ("default", "mlx_dp")):
        median, ci = paired_ratio(t[ours], t[theirs])
        shown = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[-]"
        print(f"  {ours}/{theirs}: paired median {median:.3f}, 90% interval {shown}")
    print("OVERLAP " + json.dumps({"args": vars(args), "buckets": nbuckets, "times_ms": t}), flush=True)


def netns_main(args):
    """Launch this script on ``--netns`` namespaces (tests/netns.py), links shaped to ``--rate``."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    import tempfile

    from netns import TestHosts

    rank_args = _without(sys.argv[1:], "--netns", "--rate")  # the ranks run rank_main
    hosts = TestHosts(args.netns)
    try:
        if args.rate:
            hosts.shape(args.rate)
        with tempfile.TemporaryDirectory(prefix="overlap-probe-") as tmp:
            env = {"DISTOPT_RSH": hosts.rsh, "PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent) + ":/usr/sbin:/usr/bin:/sbin:/bin"}
            argv = [sys.executable, "-m", "distopt.cli", "launch", "--backend", "ring", "--hostfile",
                    str(hosts.hostfile(Path(tmp) / "hosts.json")), __file__, *rank_args]
            print(f"links: {args.rate or 'unshaped'}", flush=True)
            subprocess.run(argv, env=env, check=True, timeout=3600)
    finally:
        hosts.close()


def _without(argv, *flags):
    """``argv`` less each of ``flags`` and the value after it."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    a = parse()
    netns_main(a) if a.netns else rank_main(a)
