"""``distopt ckpt inspect DIR`` and ``distopt ckpt consolidate DIR OUT``."""

import json
import math

import click

from ..consolidate import consolidate, summary
from ..manifest import CheckpointError


@click.group("ckpt")
def ckpt_command():
    """Inspect distopt checkpoints and convert them to plain MLX files."""


@ckpt_command.command("inspect")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--no-verify", is_flag=True, help="Do not check the files' sha256.")
def inspect_command(directory, no_verify):
    """Summarize DIR and check its files' sha256.

    DIR is a checkpoint or a checkpoint root (its latest checkpoint). Exits 1 if a
    file is missing or altered.
    """
    try:
        m = summary(directory, verify=not no_verify)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_summary(m))
    if any(v.startswith("BAD") for v in m["check"].values()):
        raise SystemExit(1)


@ckpt_command.command("consolidate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
def consolidate_command(directory, out):
    """Convert DIR to plain MLX files in OUT.

    Writes OUT/model.safetensors (weights) and OUT/optimizer.safetensors (the
    mlx.optimizers state, flattened), plus OUT/master.safetensors for fp32 master
    weights. Existing files are never overwritten.
    """
    try:
        written = consolidate(directory, out)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    for path in written:
        click.echo(f"wrote {path}")


def format_summary(m):
    """A few aligned lines: what a user checks before resuming."""
    opt = m["optimizer"]
    hyper = " ".join(f"{k}={v}" for k, v in opt["hyperparameters"].items())
    sched = f"; scheduled: {', '.join(opt['schedules'])}" if opt["schedules"] else ""
    lr = "n/a" if m["learning_rate"] is None else f"{m['learning_rate']:.6g}"
    params = sum(math.prod(s) for _, s, _ in m["model"]["arrays"])
    lines = [
        f"checkpoint  {m['path']}",
        f"step        {m['step']} (optimizer step {m['optimizer_step']}, learning rate {lr})",
        f"optimizer   {opt['class']} {hyper}{sched}",
        f"saved by    {m['world_size']} rank(s) as {m['num_shards']} optimizer shard(s), {m['created']}",
        f"model       {len(m['model']['arrays'])} arrays, {params:,} parameters",
    ]
    for name, buf in m["buffers"].items():
        keys = ", ".join(f"{k} ({d})" for k, d in buf["keys"].items())
        lines.append(
            f"state       {name}: {buf['size']:,} elements (padded {buf['padded_size']:,}), "
            f"{len(buf['buckets'])} bucket(s); keys {keys}"
        )
    lines.append(f"metadata    {json.dumps(m['metadata'], default=str)}")
    lines.append("files")
    for name, info in sorted(m["files"].items()):
        lines.append(f"  {name:<40} {info['bytes']:>12,} B  sha256 {info['sha256'][:12]}  {m['check'][name]}")
    return "\n".join(lines)
