"""``python -m distopt.cli`` runs the ``distopt`` command."""

from . import main

main(prog_name="distopt")
