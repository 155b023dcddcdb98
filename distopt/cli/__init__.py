"""The ``distopt`` command line: a click group; each subcommand lives in its own module."""

import click

from .bench import bench_command
from .ckpt import ckpt_command
from .doctor import doctor_command
from .launch import launch_command
from .plan import plan_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Data-parallel MLX training with ZeRO sharded optimizers.

    \b
    Getting started:
      distopt doctor                          check this machine (add --hostfile F for others)
      distopt launch -n 2 examples/mlp.py     train on 2 ranks here
      distopt plan --params 7e9 -n 4 --memory 64 --master-weights
                                              memory per Mac, and whether it fits
      distopt launch --hostfile F train.py    train across the Macs of F

    Run `distopt COMMAND --help` for each command's options; docs/ has the guides.
    """


main.add_command(launch_command)
main.add_command(ckpt_command)
main.add_command(doctor_command)
main.add_command(plan_command)
main.add_command(bench_command)
