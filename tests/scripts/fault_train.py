"""Rank script: a small sharded training run into which one fault is injected.

    fault_train.py FAULT RANK STEP [--steps K] [--ckpt DIR] [--pause S]

FAULT is what rank RANK does at step STEP:

* ``none``: nothing; every rank trains K steps and prints ``done``.
* ``kill``: SIGKILL itself (as ``kill -9`` would) after computing its gradients.
* ``raise``: raise ``RuntimeError("injected fault ...")`` in the middle of the step.
* ``hang``: stop taking part (sleep forever) before the step's collectives.
* ``nojoin``: never call ``distopt.init`` (sleep forever); STEP is ignored.

Every rank prints ``step k`` after each evaluated step and ``pid P`` at start. With
``--ckpt DIR`` and ``distopt.save_checkpoint`` available, a checkpoint is saved every
5 steps and ``checkpoint k`` printed.
"""

import argparse
import os
import signal
import time

import mlx.core as mx
import mlx.nn as nn

import distopt


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("fault", choices=["none", "kill", "raise", "hang", "nojoin"])
    p.add_argument("rank", type=int)
    p.add_argument("step", type=int)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--pause", type=float, default=0.02, help="seconds of 'data loading' per step")
    p.add_argument("--tag", default="", help="ignored; lets a test find this job's processes")
    return p.parse_args()


def inject(args, rank, step):
    """Do the fault if this is the faulty rank's faulty step."""
    if args.fault == "none" or rank != args.rank or step != args.step:
        return
    print(f"injecting {args.fault} at step {step}", flush=True)
    if args.fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if args.fault == "raise":
        raise RuntimeError(f"injected fault at step {step}")
    if args.fault == "hang":
        while True:
            time.sleep(3600)


def build():
    """The model and optimizer every rank (and a checkpoint reader) builds."""
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    mx.eval(model.parameters())
    return model, distopt.Adamax(learning_rate=1e-2)


def main():
    args = parse()
    env_rank = int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "-1")))
    print(f"pid {os.getpid()}", flush=True)
    if args.fault == "nojoin" and env_rank == args.rank:
        print("not joining", flush=True)
        while True:
            time.sleep(3600)
    group = distopt.init()
    rank = group.rank()
    model, opt = build()
    save = getattr(distopt, "save_checkpoint", None) if args.ckpt else None
    mx.random.seed(1 + rank)
    x, y = mx.random.normal((32, 16)), mx.random.randint(0, 4, (32,))

    def loss_fn(model):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    for step in range(1, args.steps + 1):
        time.sleep(args.pause)
        loss, grads = nn.value_and_grad(model, loss_fn)(model)
        mx.eval(loss, grads)
        inject(args, rank, step)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        print(f"step {step} loss {loss.item():.4f}", flush=True)
        if save is not None and step % 5 == 0:
            save(args.ckpt, model, opt, step=step, metadata={"step": step})
            print(f"checkpoint {step}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
