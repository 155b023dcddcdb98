"""Gradient accumulation: k micro-batches per optimizer step, no communication before the last.

The gradients of ``k`` equal-sized micro-batches are summed locally (in float32) and
their mean is handed to the optimizer once:

.. math::

    g = \\frac{1}{k} \\sum_{j=1}^{k} \\nabla L(w; B_j) = \\nabla L(w; B_1 \\cup \\dots \\cup B_k)

for a loss that is a mean over examples, so one accumulated step equals one step on
the concatenated batch. Only the optimizer step communicates, so the ``k - 1`` first
micro-batches cost no network traffic at all.
"""

import mlx.core as mx
from mlx.utils import tree_map


class GradientAccumulator:
    """Sum the gradients of ``steps`` micro-batches; release their mean on the last.

    Eager use::

        acc = distopt.GradientAccumulator(steps=4)
        for x, y in micro_batches:
            loss, grads = loss_and_grad(model, x, y)
            grads = acc.add(grads)             # None until the 4th micro-batch
            if grads is not None:
                opt.update(model, grads)

    Under ``mx.compile``, keep the counting outside the compiled functions: compile
    one function that calls :meth:`accumulate` and one that calls :meth:`release`
    and updates, both with ``acc.state`` in their inputs and outputs, after
    ``acc.init(model.trainable_parameters())``.

    Args:
        steps (int): micro-batches per optimizer step ``k``.
        dtype (mlx.core.Dtype): dtype of the running sum. Default: ``mlx.core.float32``
    """

    def __init__(self, steps, dtype=mx.float32):
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}.")
        self.steps = int(steps)
        self.dtype = dtype
        self.count = 0
        self.state = {}

    def init(self, parameters):
        """Allocate the zero running sum shaped like ``parameters``."""
        self.state["sum"] = tree_map(lambda p: mx.zeros(p.shape, self.dtype), parameters)

    def accumulate(self, grads):
        """Add one micro-batch's ``grads`` to the running sum (compile-safe)."""
        if "sum" not in self.state:
            self.init(grads)
        self.state["sum"] = tree_map(lambda s, g: s + g.astype(self.dtype), self.state["sum"], grads)

    def release(self, grads):
        """The mean of the running sum plus ``grads``, in each gradient's dtype; resets the sum."""
        if "sum" not in self.state:
            self.init(grads)
        mean = tree_map(lambda s, g: ((s + g.astype(self.dtype)) / self.steps).astype(g.dtype), self.state["sum"], grads)
        self.state["sum"] = tree_map(mx.zeros_like, self.state["sum"])
        return mean

    def add(self, grads):
        """Accumulate ``grads``; returns the mean on every ``steps``-th call, else ``None``."""
        self.count += 1
        if self.count < self.steps:
            self.accumulate(grads)
            return None
        self.count = 0
        return self.release(grads)
