"""SGD, Adagrad and Adamax with the arguments, state and math of ``mlx.optimizers``, sharded.

Each class builds the matching ``mlx.optimizers`` optimizer (so defaults, validation
errors and update math are MLX's own) and shards it with :class:`ShardedOptimizer`.
The keyword-only ``group``, ``stage``, ``bucket_bytes``, ``shard_weights`` and the
precision options (``master_weights``, ``reduce_dtype``, ``max_norm``,
``skip_nonfinite``, ``loss_scale``), ``cache_step_buffers`` and ``overlap_backward`` are those of
:class:`ShardedOptimizer`.
"""

from typing import Callable, List, Union

import mlx.core as mx
import mlx.optimizers as optim

from .layout import DEFAULT_BUCKET_BYTES
from .sharded import ShardedOptimizer

LearningRate = Union[float, Callable[[mx.array], mx.array]]


class SGD(ShardedOptimizer):
    r"""Stochastic gradient descent with momentum, sharded across ranks.

    .. math::

        v_{t+1} &= \mu v_t + (1 - \tau) g_t \\
        w_{t+1} &= w_t - \lambda v_{t+1}

    with ``g_t`` the rank-averaged gradient plus ``weight_decay * w_t``, and with
    Nesterov momentum ``w_{t+1} = w_t - \lambda (g_t + \mu v_{t+1})``.

    Args:
        learning_rate (float or callable): The learning rate :math:`\lambda`.
        momentum (float, optional): The momentum strength :math:`\mu`. Default: ``0``
        weight_decay (float, optional): The weight decay (L2 penalty). Default: ``0``
        dampening (float, optional): Dampening for momentum :math:`\tau`. Default: ``0``
        nesterov (bool, optional): Enables Nesterov momentum. Default: ``False``
    """

    def __init__(
        self,
        learning_rate: LearningRate,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        *,
        group=None,
        stage: int = 1,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        shard_weights=None,
        master_weights: bool = False,
        reduce_dtype=None,
        max_norm=None,
        skip_nonfinite: bool = False,
        loss_scale=None,
        cache_step_buffers: bool = True,
        overlap_backward: bool = True,
    ):
        inner = optim.SGD(learning_rate, momentum, weight_decay, dampening, nesterov)
        super().__init__(
            inner, group=group, stage=stage, bucket_bytes=bucket_bytes, shard_weights=shard_weights,
            master_weights=master_weights, reduce_dtype=reduce_dtype, max_norm=max_norm,
            skip_nonfinite=skip_nonfinite, loss_scale=loss_scale, cache_step_buffers=cache_step_buffers,
            overlap_backward=overlap_backward,
        )  # fmt: skip


class Adagrad(ShardedOptimizer):
    r"""The Adagrad optimizer [1], sharded across ranks.

    [1]: Duchi, J., Hazan, E. and Singer, Y., 2011. Adaptive subgradient methods
    for online learning and stochastic optimization. JMLR 2011.

    .. math::

        v_{t+1} &= v_t + g_t^2 \\
        w_{t+1} &= w_t - \lambda \frac{g_t}{\sqrt{v_{t+1}} + \epsilon}

    Args:
        learning_rate (float or callable): The learning rate :math:`\lambda`.
        eps (float, optional): The term :math:`\epsilon` added to the denominator
          to improve numerical stability. Default: ``1e-8``
    """

    def __init__(
        self,
        learning_rate: LearningRate,
        eps: float = 1e-8,
        *,
        group=None,
        stage: int = 1,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        shard_weights=None,
        master_weights: bool = False,
        reduce_dtype=None,
        max_norm=None,
        skip_nonfinite: bool = False,
        loss_scale=None,
        cache_step_buffers: bool = True,
        overlap_backward: bool = True,
    ):
        inner = optim.Adagrad(learning_rate, eps)
        super().__init__(
            inner, group=group, stage=stage, bucket_bytes=bucket_bytes, shard_weights=shard_weights,
            master_weights=master_weights, reduce_dtype=reduce_dtype, max_norm=max_norm,
            skip_nonfinite=skip_nonfinite, loss_scale=loss_scale, cache_step_buffers=cache_step_buffers,
            overlap_backward=overlap_backward,
        )  # fmt: skip


class Adamax(ShardedOptimizer):
    r"""The Adamax optimizer, a variant of Adam based on the infinity norm [1], sharded.

    As in ``mlx.optimizers.Adamax``, there is no bias correction.

    [1]: Kingma, D.P. and Ba, J., 2015. Adam: A method for stochastic optimization. ICLR 2015.

    .. math::

        m_{t+1} &= \beta_1 m_t + (1 - \beta_1) g_t \\
        v_{t+1} &= \max(\beta_2 v_t, |g_t|) \\
        w_{t+1} &= w_t - \lambda \frac{m_{t+1}}{v_{t+1} + \epsilon}

    Args:
        learning_rate (float or callable): The learning rate :math:`\lambda`.
        betas (Tuple[float, float], optional): The coefficients
          :math:`(\beta_1, \beta_2)`. Default: ``(0.9, 0.999)``
        eps (float, optional): The term :math:`\epsilon` added to the
          denominator to improve numerical stability. Default: ``1e-8``
    """

    def __init__(
        self,
        learning_rate: LearningRate,
        betas: List[float] = [0.9, 0.999],
        eps: float = 1e-8,
        *,
        group=None,
        stage: int = 1,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        shard_weights=None,
        master_weights: bool = False,
        reduce_dtype=None,
        max_norm=None,
        skip_nonfinite: bool = False,
        loss_scale=None,
        cache_step_buffers: bool = True,
        overlap_backward: bool = True,
    ):
        inner = optim.Adamax(learning_rate, betas, eps)
        super().__init__(
            inner, group=group, stage=stage, bucket_bytes=bucket_bytes, shard_weights=shard_weights,
            master_weights=master_weights, reduce_dtype=reduce_dtype, max_norm=max_norm,
            skip_nonfinite=skip_nonfinite, loss_scale=loss_scale, cache_step_buffers=cache_step_buffers,
            overlap_backward=overlap_backward,
        )  # fmt: skip
