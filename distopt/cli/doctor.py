"""``distopt doctor``: check the installation, the backends, other hosts and the links."""

import click


@click.command("doctor", short_help="Check the install, backends, hosts and links; print fixes.")
@click.option("--hostfile", metavar="FILE", type=click.Path(dir_okay=False),
              help="Also check every host of this hostfile: ssh, versions, folder, IPs, ring ports.")
@click.option("--python", metavar="PATH", help="Python that runs the ranks on every host. Default: this one.")
@click.option("--port", type=click.IntRange(1, 65535), metavar="P",
              help="First ring port on the hosts, as for distopt launch --port. Default: 5000.")
@click.option("--no-bandwidth", is_flag=True, help="Skip the 2-rank all_sum bandwidth test (a few seconds per backend).")
@click.option("--mib", type=click.IntRange(min=1), default=16, show_default=True,
              help="MiB per all_sum in the bandwidth test.")
@click.pass_context
def doctor_command(ctx, hostfile, python, port, no_bandwidth, mib):
    """Check that distopt can run here (and on the hosts of FILE); print how to fix what is wrong.

    Checks MLX and its distributed backends, Open MPI, mpi4py and MLX_MPI_LIBNAME,
    local ports and the macOS firewall, then ssh, versions (Python, MLX, distopt,
    mpi4py, Open MPI), the project folder, IPs and ring ports on every host of the
    hostfile, and finally the all_sum bandwidth between 2 local ranks for the ring
    and MPI backends. Exits 1 if any check fails.
    """
    from ..doctor import report, run_checks

    checks = run_checks(hostfile=hostfile, python=python, bandwidth_test=not no_bandwidth, mib=mib, port=port)
    ctx.exit(report(checks))
