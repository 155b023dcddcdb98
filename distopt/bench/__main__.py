"""``python -m distopt.bench``: the ``distopt bench`` command (and its rank workers)."""

from . import main

main()
