"""``distopt launch``: run a Python script as N ranks on the ring or MPI backend."""

import click

from ..hostfile import HostfileError, load_hostfile
from ..launcher import BACKENDS, GRACE_SECONDS, LaunchError, launch


def _parse_env(ctx, param, values):
    """``("K=V", ...)`` into a dict, rejecting entries without ``=``."""
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx, param)
        env[key] = value
    return env


def _load_hostfile(ctx, param, path):
    if path is None:
        return None
    try:
        return load_hostfile(path)
    except HostfileError as e:
        raise click.BadParameter(str(e), ctx, param) from None


@click.command(
    "launch",
    short_help="Run a script as N ranks (here, or across the hosts of a hostfile).",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("-n", "--num-ranks", "n", type=click.IntRange(min=1),
              help="Number of ranks. Default: all slots of the hostfile.")
@click.option("--backend", type=click.Choice(BACKENDS),
              help="Communication backend. Default: the hostfile's \"backend\", else ring.")
@click.option("--hostfile", callback=_load_hostfile, metavar="FILE",
              help="Hosts to run on: Open MPI (host slots=K), MLX JSON or MLX ring JSON.")
@click.option("--port", type=click.IntRange(1, 65535),
              help="Ring: first port; rank k listens on PORT+k. Default: free ports locally, 5000 on remote hosts.")
@click.option("--python", metavar="PATH", help="Python that runs the ranks. Default: this one.")
@click.option("--env", "env", multiple=True, callback=_parse_env, metavar="KEY=VALUE",
              help="Set a variable in every rank (repeatable).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop all ranks after this many seconds (exit code 124).")
@click.option("--grace", type=click.FloatRange(min=0), default=GRACE_SECONDS, show_default=True,
              metavar="SECONDS", help="Wait between SIGTERM and SIGKILL when stopping ranks.")
@click.argument("script", type=click.Path(dir_okay=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def launch_command(ctx, n, backend, hostfile, port, python, env, timeout, grace, script, args):
    """Run `python SCRIPT ARGS...` as N ranks and show every rank's output.

    Each line is prefixed with `[rank k]`. When a rank fails the others are
    stopped and the launcher exits with that rank's code; Ctrl-C stops all.
    """
    if n is None:
        if hostfile is None:
            raise click.UsageError("give -n N, or a --hostfile whose slots set the number of ranks")
        n = hostfile.slots
    backend = backend or _hostfile_backend(hostfile)
    env = {**_hostfile_envs(hostfile), **env}
    try:
        code = launch(n, script, args, backend=backend, hostfile=hostfile, port=port,
                      python=python, env=env, timeout=timeout, grace=grace)
    except HostfileError as e:
        raise click.UsageError(str(e)) from None
    except LaunchError as e:
        raise click.ClickException(str(e)) from None
    ctx.exit(code)


def _hostfile_backend(hostfile):
    backend = hostfile.backend if hostfile is not None else None
    if backend is None:
        return "ring"
    if backend not in BACKENDS:
        raise click.UsageError(
            f"{hostfile.path} asks for backend {backend!r}, which distopt launch does not "
            f"run; pass --backend {' or '.join(BACKENDS)}"
        )
    return backend


def _hostfile_envs(hostfile):
    if hostfile is None:
        return {}
    return dict(item.split("=", 1) for item in hostfile.envs)
