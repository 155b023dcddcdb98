"""Pieces shared by the examples: arguments, each rank's slice of a batch, checkpoints.

Every example follows the same data-parallel recipe, which is what makes the loss
curve the same for any number of ranks N with the same global batch B:

1. every rank builds the same model from the same seed and sees the same global batch;
2. rank r takes rows ``[r*B/N, (r+1)*B/N)`` of it and computes the mean loss and its
   gradient on them;
3. the distopt optimizer averages the gradients over ranks (the mean over B rows) and
   applies one update, identical on every rank;
4. the printed loss is the mean of the ranks' losses (``all_sum / N``).
"""

import argparse
from pathlib import Path

import mlx.core as mx

import distopt
from distopt.progress import show_rank_errors


def parser(description, steps, batch_size, lr):
    """An argument parser with the options every example takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=steps, help=f"training steps (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"global batch size, split over ranks (default {batch_size})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and data (default 0)")
    p.add_argument("--log-every", type=int, default=10, help="print a line every this many steps (default 10)")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="save a checkpoint here at the end (and every --save-every steps)")
    p.add_argument("--save-every", type=int, default=0, help="also save every this many steps (default: only at the end)")
    p.add_argument(
        "--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
        help="continue from the latest checkpoint in --checkpoint-dir, or from CHECKPOINT (a checkpoint folder)",
    )
    return p


def setup(args):
    """Start the process group; check the batch splits evenly. Returns ``(group, local_batch)``."""
    group = distopt.init()
    show_rank_errors(group.rank())
    if args.batch_size % group.size():
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the number of ranks ({group.size()}).")
    if args.resume is True and args.checkpoint_dir is None:
        raise SystemExit("--resume needs --checkpoint-dir, or a checkpoint: --resume DIR.")
    return group, args.batch_size // group.size()


def local_rows(x, group):
    """This rank's equal slice (along axis 0) of a global batch ``x``."""
    n = x.shape[0] // group.size()
    return x[group.rank() * n : (group.rank() + 1) * n]


def global_mean(value, group):
    """Mean of a scalar over ranks (collective)."""
    if group.size() == 1:
        return value
    return mx.distributed.all_sum(value, group=group) / group.size()


def progress_for(args, group, optimizer, start=0, unit="tok"):
    """A :class:`distopt.Progress` for rank 0 that also shows the optimizer's bytes per step."""
    traffic = optimizer if group.size() > 1 else None
    return distopt.Progress(args.steps, rank=group.rank(), start=start, every=args.log_every, traffic=traffic, unit=unit)


def save(directory, step, model, optimizer, keep_last=3):
    """Save the model, the optimizer state and the step under ``directory`` (collective)."""
    distopt.save_checkpoint(directory, model, optimizer, step=step, metadata={"step": step}, keep_last=keep_last)


def resume(args, model, optimizer):
    """The step to start from: 0, or that of the checkpoint ``--resume`` names, loaded (collective).

    A checkpoint saved by any number of ranks loads at this one.
    """
    if not args.resume:
        return 0
    directory = args.checkpoint_dir if args.resume is True else args.resume
    try:
        return distopt.load_checkpoint(directory, model, optimizer)["step"]
    except distopt.CheckpointError as e:  # raised on every rank alike
        raise SystemExit(f"cannot resume: {e}") from None
