"""Benchmark (prints figures): save, load and consolidate a checkpoint of a large MLP.

    distopt launch -n 2 tests/scripts/ckpt_bench.py [--millions 50] [--dir /tmp/ckpt-bench]

Adamax state (m, v) plus weights, float32. Rank 0 prints wall times (barrier to barrier)
and bytes; consolidation runs on rank 0 alone.
"""

import argparse
import shutil
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

import distopt
from distopt.consolidate import consolidate


def barrier(group):
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--millions", type=float, default=50)
    parser.add_argument("--dir", default="/tmp/ckpt-bench")
    args = parser.parse_args()
    group = distopt.init()
    rank, width = group.rank(), 2048
    layers = max(1, round(args.millions * 1e6 / (width * width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    mx.eval(model.parameters())
    opt = distopt.Adamax(1e-3)
    grads = {"layers": [{"weight": mx.ones_like(layer.weight) * 1e-3, "bias": mx.ones_like(layer.bias) * 1e-3} for layer in model.layers]}
    opt.update(model, grads)
    mx.eval(model.parameters(), opt.state)
    root = Path(args.dir)
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    barrier(group)
    t0 = time.perf_counter()
    path = distopt.save_checkpoint(root, model, opt)
    barrier(group)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    distopt.load_checkpoint(root, model, opt)
    barrier(group)
    t_load = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in path.iterdir())
    params = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    if rank == 0:
        t0 = time.perf_counter()
        consolidate(path, root / "consolidated")
        t_cons = time.perf_counter() - t0
        mb = size / 1e6
        print(f"ranks {group.size()}, {params / 1e6:.1f}M parameters, Adamax, checkpoint {mb:.0f} MB")
        print(f"save_checkpoint  {t_save:6.2f} s  ({mb / t_save:6.0f} MB/s)")
        print(f"load_checkpoint  {t_load:6.2f} s  ({mb / t_load:6.0f} MB/s)")
        print(f"consolidate      {t_cons:6.2f} s  (one process)")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
