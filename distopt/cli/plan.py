"""``distopt plan``: will this model train on these Macs? Bytes per rank at stage 1 and 2."""

import click

from ..layout import DEFAULT_BUCKET_BYTES
from ..plan import BACKENDS, DTYPES, format_plan, plan, safetensors_sizes


@click.command("plan", short_help="Memory per rank for a model, optimizer and N; does it fit?")
@click.option("--params", "params", type=float, help="Number of parameters, e.g. 7e9.")
@click.option("--weights", "weights", multiple=True, type=click.Path(exists=True), help="A .safetensors file or a folder of them (only headers are read); instead of --params.")
@click.option("--optimizer", default="adamax", show_default=True, help="sgd, adagrad, adamax, adam, adamw, rmsprop, adadelta, lion.")
@click.option("--dtype", default=None, type=click.Choice(sorted(DTYPES)), help="Parameter dtype.  [default: bf16, or the weights' own]")
@click.option("-n", "--ranks", "world_size", default=1, show_default=True, type=click.IntRange(min=1), help="Number of ranks (Macs).")
@click.option("--memory", "memory", multiple=True, type=float, help="Memory of each Mac in GiB; once for all, or once per rank.")
@click.option("--master-weights/--no-master-weights", default=False, show_default=True, help="fp32 master shards for half-precision models.")
@click.option("--reduce-fp32", is_flag=True, help="Reduce half-precision gradients in fp32.")
@click.option("--shard-by-memory", is_flag=True, help="Size each rank's shard by its --memory (shard_weights).")
@click.option("--bucket-mb", default=DEFAULT_BUCKET_BYTES / 1024**2, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Reduction bucket size in MiB.")
@click.option("--backend", default="ring", show_default=True, type=click.Choice(BACKENDS), help="ring/mpi gather into the new parameters; jaccl/nccl through a gathered bucket.")
@click.option("--usable", "usable_fraction", default=0.75, show_default=True, type=click.FloatRange(0, 1, min_open=True), help="Share of memory training may use.")
def plan_command(params, weights, optimizer, dtype, world_size, memory, master_weights, reduce_fp32, shard_by_memory, bucket_mb, backend, usable_fraction):
    """Print the memory per rank of a sharded training run, and whether it fits.

    \b
    Examples:
      distopt plan --params 7e9 --optimizer adamax --dtype bf16 -n 4 --memory 64
      distopt plan --weights ~/models/my-model/ -n 2 --memory 64 --memory 32 --master-weights
    """
    import mlx.core as mx

    if (params is None) == (not weights):
        raise click.UsageError("Give either --params N or --weights FILE_OR_FOLDER.")
    try:
        source = params if params is not None else safetensors_sizes(weights)
        result = plan(
            source, optimizer, dtype, world_size, list(memory) or None,
            master_weights=master_weights, reduce_dtype=mx.float32 if reduce_fp32 else None,
            bucket_bytes=int(bucket_mb * 1024**2), usable_fraction=usable_fraction, backend=backend,
            shard_weights="memory" if shard_by_memory else None,
        )  # fmt: skip
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    click.echo(format_plan(result))
