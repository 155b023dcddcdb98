"""Mixed precision for the ZeRO step: fp32 master shards, global clipping, non-finite skip.

Everything here works on this rank's *shards* of the mean gradient (one flat array per
bucket of each dtype buffer) and is lazy: no host synchronisation, so a step using it can run under
``mx.compile``. Ranks agree through one small ``all_sum`` of two numbers,

.. math::

    s = \\sum_r \\lVert \\bar g^{(r)} \\rVert_2^2, \\qquad
    c = \\sum_r \\#\\{i : \\bar g^{(r)}_i \\notin \\mathbb{R}\\},

from which every rank derives the same global norm :math:`\\lVert \\bar g \\rVert = \\sqrt{s}`,
the same clipping coefficient and the same decision to skip the step (:math:`c > 0`).
"""

from dataclasses import dataclass

import mlx.core as mx

HALF = (mx.float16, mx.bfloat16)


@dataclass(frozen=True)
class DynamicLossScale:
    """Dynamic loss scaling for float16 training, as in mixed-precision practice.

    Multiply the loss by ``optimizer.loss_scale`` before differentiating; the optimizer
    divides the gradient by the same scale. A step with inf/NaN gradients is skipped
    and the scale multiplied by ``backoff_factor``; after ``growth_interval``
    consecutive good steps the scale is multiplied by ``growth_factor``.

    Args:
        init_scale (float): The first scale. Default: ``2**16``
        growth_factor (float): Growth after ``growth_interval`` good steps. Default: ``2``
        backoff_factor (float): Factor applied on a non-finite step. Default: ``0.5``
        growth_interval (int): Good steps between growths. Default: ``2000``
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self):
        if not self.init_scale > 0 or not self.growth_factor >= 1 or not 0 < self.backoff_factor <= 1:
            raise ValueError(
                "DynamicLossScale needs init_scale > 0, growth_factor >= 1 and 0 < backoff_factor <= 1; "
                f"got {self.init_scale}, {self.growth_factor}, {self.backoff_factor}."
            )
        if int(self.growth_interval) != self.growth_interval or self.growth_interval < 1:
            raise ValueError(f"growth_interval must be a positive integer, got {self.growth_interval!r}.")

    def update(self, state, ok):
        """Next ``(loss_scale, good_steps)`` after a step that was finite iff ``ok``."""
        scale, good = state["loss_scale"], state["loss_scale_good_steps"]
        good = mx.where(ok, good + 1, 0)
        grow = good >= self.growth_interval
        scale = mx.where(ok, mx.where(grow, scale * self.growth_factor, scale), scale * self.backoff_factor)
        return scale, mx.where(grow, 0, good)


@dataclass(frozen=True)
class Precision:
    """The precision options of a :class:`~distopt.ShardedOptimizer` (see its docstring)."""

    master_weights: bool = False
    reduce_dtype: mx.Dtype = None
    max_norm: float = None
    skip_nonfinite: bool = False
    loss_scale: object = None

    def __post_init__(self):
        if not isinstance(self.master_weights, bool):
            raise TypeError(f"master_weights must be True or False, got {self.master_weights!r}.")
        if self.reduce_dtype is not None and self.reduce_dtype != mx.float32:
            raise ValueError(f"reduce_dtype must be None (the model's dtype) or mlx.core.float32, got {self.reduce_dtype!r}.")
        if self.max_norm is not None and not (isinstance(self.max_norm, (int, float)) and self.max_norm >= 0):
            raise ValueError(f"max_norm should be >=0, {self.max_norm} was provided instead")
        scale = self.loss_scale
        if scale is not None and not isinstance(scale, DynamicLossScale) and not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"loss_scale must be None, a positive number or distopt.DynamicLossScale(...), got {scale!r}.")

    @property
    def dynamic(self):
        """True when the loss scale is a :class:`DynamicLossScale`."""
        return isinstance(self.loss_scale, DynamicLossScale)

    @property
    def checks(self):
        """True when the step needs the global gradient statistics (one small all_sum)."""
        return self.max_norm is not None or self.skip_nonfinite or self.loss_scale is not None

    @property
    def skips(self):
        """True when a non-finite step is skipped (``skip_nonfinite`` or any loss scale)."""
        return self.skip_nonfinite or self.loss_scale is not None

    @property
    def active(self):
        """True when any option differs from the plain inner optimizer's behaviour."""
        return self.master_weights or self.reduce_dtype is not None or self.checks

    def settings(self):
        """Plain values, compared across ranks."""
        scale = self.loss_scale
        return {
            "master_weights": self.master_weights,
            "reduce_dtype": None if self.reduce_dtype is None else "float32",
            "max_norm": self.max_norm,
            "skip_nonfinite": self.skip_nonfinite,
            "loss_scale": vars(scale) if self.dynamic else scale,
        }

    def has_master(self, dtype):
        """Whether a buffer of ``dtype`` keeps an fp32 master copy of its shard."""
        return self.master_weights and dtype in HALF

    def work_dtype(self, dtype):
        """The dtype of the gradient shard, the state and the update for a ``dtype`` buffer."""
        return mx.float32 if self.has_master(dtype) else dtype

    def init_state(self):
        """The extra top-level state entries these options need (arrays, compile-safe)."""
        state = {}
        if self.checks:
            state["grad_norm"] = mx.array(0.0, mx.float32)
        if self.skips:
            state["skipped_steps"] = mx.array(0, mx.int32)
        if self.loss_scale is not None:
            init = self.loss_scale.init_scale if self.dynamic else self.loss_scale
            state["loss_scale"] = mx.array(init, mx.float32)
        if self.dynamic:
            state["loss_scale_good_steps"] = mx.array(0, mx.int32)
        return state

    def prepare(self, grads, state, group):
        """Unscale, measure and clip the mean gradient shards ``{name: [part per bucket]}``.

        Returns ``(grads, coefficient, ok)``: the unscaled shards, the clipping
        coefficient :math:`\\min(\\text{max\\_norm} / (\\lVert \\bar g \\rVert + 10^{-6}), 1)`
        (``None`` without clipping), and the 0-d boolean "every rank's gradient is finite"
        (``None`` unless non-finite steps are skipped). Updates ``grad_norm``, ``skipped_steps`` and
        the loss scale in ``state``. The coefficient is that of
        ``mlx.optimizers.clip_grad_norm`` on the full mean gradient.
        """
        if not self.checks:
            return grads, None, None
        if self.loss_scale is not None:
            unscale = lambda g: (g.astype(mx.float32) / state["loss_scale"]).astype(g.dtype)  # noqa: E731
            grads = {name: [unscale(g) for g in parts] for name, parts in grads.items()}
        stats = sum(gradient_stats(g) for parts in grads.values() for g in parts)
        if group.size() > 1:
            stats = mx.distributed.all_sum(stats, group=group)
        norm, ok = mx.sqrt(stats[0]), stats[1] == 0
        state["grad_norm"] = norm
        coefficient = None if self.max_norm is None else mx.minimum(self.max_norm / (norm + 1e-6), 1.0)
        if not self.skips:
            return grads, coefficient, None  # clipping only: the step runs whatever it holds, as in MLX
        state["skipped_steps"] = state["skipped_steps"] + mx.where(ok, 0, 1).astype(mx.int32)
        if self.dynamic:
            state["loss_scale"], state["loss_scale_good_steps"] = self.loss_scale.update(state, ok)
        return grads, coefficient, ok


def gradient_stats(shard):
    """``[sum of squares, count of non-finite elements]`` of one shard, in float32."""
    g = shard.astype(mx.float32)
    return mx.stack([g.square().sum(), (~mx.isfinite(g)).sum().astype(mx.float32)])


def clip(grad, coefficient):
    """``grad`` scaled by the clipping coefficient, kept in its dtype (as MLX clips)."""
    return grad if coefficient is None else (grad * coefficient).astype(grad.dtype)


def select(ok, new, old):
    """``new`` where the step is finite (``ok``), else ``old``: a skipped step changes nothing."""
    if ok is None:
        return new
    if isinstance(new, dict):
        return {k: select(ok, v, old[k]) for k, v in new.items()}
    return mx.where(ok, new, old)
