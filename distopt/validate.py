"""Checks of user input that must fail at once, with a message naming the problem.

They run on the rank that got the input, before any collective, so a bad input
gives a ``ValueError`` instead of a rank that waits forever for the others.
"""

import math
import numbers

import mlx.core as mx
from mlx.utils import tree_flatten

from .evaluation import traced
from .layout import dtype_name


def check_learning_rate(value):
    """Raise ``ValueError`` unless ``value`` is a finite number >= 0.

    Python numbers and concrete 0-d arrays are checked; an array inside
    ``mx.compile`` (which cannot be read) and schedules are left alone.
    """
    if isinstance(value, mx.array):
        if value.ndim != 0 or traced(value):
            return
        value = value.item()
    if not isinstance(value, numbers.Real):
        return
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"The learning rate must be a finite number >= 0, got {value:g}.")


def check_gradients(gradients, parameters):
    """Raise ``ValueError`` naming the first gradient that is not shaped and typed as its parameter.

    ``parameters`` may hold more entries than ``gradients`` (as in ``mlx.optimizers``).
    """
    params = dict(tree_flatten(parameters))
    for path, grad in tree_flatten(gradients):
        if not isinstance(grad, mx.array):
            continue
        param = params.get(path)
        if not isinstance(param, mx.array):
            raise ValueError(f"The gradients hold '{path}', which is not a parameter of the model.")
        if grad.shape != param.shape or grad.dtype != param.dtype:
            raise ValueError(
                f"The gradient of '{path}' has shape {tuple(grad.shape)} and dtype {dtype_name(grad.dtype)}; "
                f"the parameter has shape {tuple(param.shape)} and dtype {dtype_name(param.dtype)}."
            )
