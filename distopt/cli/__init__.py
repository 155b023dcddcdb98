"""The ``distopt`` command line: a click group; each subcommand lives in its own module."""

import click

from .bench import bench_command
from .ckpt import ckpt_command
from .doctor import doctor_command
from .launch import launch_command
from .plan import plan_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Data-parallel MLX training with ZeRO sharded optimizers."""


main.add_command(launch_command)
main.add_command(ckpt_command)
main.add_command(doctor_command)
main.add_command(plan_command)
main.add_command(bench_command)
