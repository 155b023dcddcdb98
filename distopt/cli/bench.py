"""``distopt bench``: distopt against MLX data parallelism and PyTorch ZeRO, side by side.

The options are those of :func:`distopt.bench.parser` (``distopt bench --help``).
"""

import click


@click.command(
    "bench",
    short_help="Benchmark distopt against MLX data parallel and PyTorch ZeRO.",
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(args):
    """Benchmark distopt against MLX DP and PyTorch ZeRO; prints a table (--help for options).

    Example: distopt bench --ranks 2,4 --sizes 1M,10M --json out.json --plot out.png
    """
    from ..bench import main

    main(list(args))
