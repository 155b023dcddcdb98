"""Shared fixtures. Launch helpers live in ``tests/helpers.py`` (``from helpers import run_ranks``)."""

import pytest

from helpers import run_ranks as _run_ranks


@pytest.fixture
def run_ranks():
    """``run_ranks(n, script, *args, backend="ring", timeout=120, env=None)`` as a fixture."""
    return _run_ranks
