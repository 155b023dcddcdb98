"""Whether an array can be evaluated now, or is a placeholder inside ``mx.compile``."""

import mlx.core as mx


def traced(x, wait=True):
    """True when ``x`` is a placeholder inside ``mx.compile`` (it cannot be evaluated).

    Otherwise ``x`` is evaluated (``wait=False``: only scheduled with ``mx.async_eval``,
    which keeps a GPU's queue full) and the answer is False.
    """
    try:
        (mx.eval if wait else mx.async_eval)(x)
        return False
    except ValueError as e:  # eval / async_eval of a compile placeholder
        if "function transformations" in str(e) or "graph transformation" in str(e):
            return True
        raise
    except RuntimeError as e:  # an array that depends on a compile input placeholder
        if "without a primitive" in str(e):
            return True
        raise
