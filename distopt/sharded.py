"""The ZeRO step: reduce-scatter gradients, update this rank's shard, gather parameters.

``ShardedOptimizer`` wraps an element-wise ``mlx.optimizers`` optimizer. Every rank
keeps the optimizer state of its shard only (1/N of the model), and every rank
ends the step with the same full parameters, as plain data parallelism would give:

.. math::

    \\bar g = \\frac{1}{N}\\sum_{r} g_r, \\qquad
    w^{(r)}_{t+1} = \\text{update}(\\bar g^{(r)}, w^{(r)}_t, s^{(r)}_t), \\qquad
    w_{t+1} = \\text{all\\_gather}_r\\, w^{(r)}_{t+1}

where :math:`x^{(r)}` is rank r's shard of the flat buffer of x.
"""

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .comm import make_communicator
from .group import DistoptError, all_gather_object, init
from .layout import DEFAULT_BUCKET_BYTES, FlatLayout

# Optimizers whose update of an element depends on that element alone, so the
# update of a flat shard equals the update of every parameter in it.
ELEMENTWISE = (
    optim.SGD, optim.RMSprop, optim.Adagrad, optim.AdaDelta,
    optim.Adam, optim.AdamW, optim.Adamax, optim.Lion,
)  # fmt: skip
HYPER_KEYS = ("step", "learning_rate")


class ShardedOptimizer(optim.Optimizer):
    """Shard an element-wise MLX optimizer's state across the ranks of a group (ZeRO).

    Args:
        optimizer (mlx.optimizers.Optimizer): the optimizer to shard. Its update must
          be element-wise (SGD, RMSprop, Adagrad, AdaDelta, Adam, AdamW, Adamax,
          Lion); Adafactor and Muon mix elements of a parameter and are refused.
        group (mx.distributed.Group, optional): the ranks to shard over; default
          :func:`distopt.init`'s world group. With one rank the optimizer runs
          unchanged.
        stage (int): 1 shards the optimizer state; 2 also keeps only this rank's
          shard of the reduced gradient, reducing bucket by bucket. Default ``1``.
        bucket_bytes (int): bytes per communication bucket. Default 64 MiB.
        shard_weights (list, optional): relative shard size per rank, e.g. the
          memory of each Mac. Equal shards by default.
    """

    def __init__(self, optimizer, *, group=None, stage=1, bucket_bytes=DEFAULT_BUCKET_BYTES, shard_weights=None):
        if not isinstance(optimizer, ELEMENTWISE):
            raise TypeError(
                f"{type(optimizer).__name__} is not element-wise, so its state cannot be sharded "
                f"by flat slices; supported: {', '.join(c.__name__ for c in ELEMENTWISE)}."
            )
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}.")
        super().__init__()
        self.inner = optimizer
        self.group = group if group is not None else init()
        self.stage = stage
        self.bucket_bytes = bucket_bytes
        self.shard_weights = shard_weights
        self.layout = None
        self._state = optimizer.state  # shares "step" and "learning_rate" with the inner optimizer
        self._schedulers = optimizer._schedulers
        self.comm = None
        self._kernel = mx.compile(self._update_shard)

    @property
    def sharded(self):
        """False with a single rank, where the inner optimizer runs unchanged."""
        return self.group.size() > 1

    @property
    def state(self):
        return self._state if self.sharded else self.inner.state

    @state.setter
    def state(self, state):
        if not self.sharded:
            self.inner.state = state
        self._initialized = False
        self._state = state

    def init(self, parameters):
        """Lay out ``parameters``, check all ranks agree, and create this rank's state shards."""
        if not self.sharded:
            return self.inner.init(parameters)
        self.layout = FlatLayout(parameters, self.group.size(), self.bucket_bytes, self.shard_weights)
        self._check_ranks_agree()
        self.comm = make_communicator(self.group, equal_parts=self.shard_weights is None)
        shards = self._state.setdefault("shards", {})
        rank = self.group.rank()
        for name, buf in self.layout.buffers.items():
            if name not in shards:
                shards[name] = {}
                self.inner.init_single(mx.zeros((buf.shard_size(rank),), buf.dtype), shards[name])
        self._initialized = True

    def apply_gradients(self, gradients, parameters):
        """Average ``gradients`` over ranks, update this rank's shard, return full parameters."""
        if not self.sharded:
            return self.inner.apply_gradients(gradients, parameters)
        if not self._initialized:
            self.init(gradients)
        self.layout.check_tree(gradients)
        self._advance_step()
        hyper = {k: self._state[k] for k in HYPER_KEYS if k in self._state}
        full = {}
        for name in self.layout.buffers:
            grad = self._reduce_shard(gradients, name) / self.group.size()
            param = self.layout.shard(parameters, name, self.group.rank())
            param, self._state["shards"][name] = self._kernel(hyper, grad, param, self._state["shards"][name])
            full[name] = self._gather(param, name)
        return self.layout.unflatten(full)

    def _advance_step(self):
        """Schedules and step counter, exactly as ``mlx.optimizers.Optimizer``."""
        for param, scheduler in self._schedulers.items():
            self._state[param] = scheduler(self.step)
        self._state["step"] = self.step + 1

    def _update_shard(self, hyper, grad, param, state):
        """The inner optimizer's element-wise math on one flat shard (compiled once per shape)."""
        saved, self.inner._state = self.inner._state, hyper
        try:
            state = dict(state)
            return self.inner.apply_single(grad, param, state), state
        finally:
            self.inner._state = saved

    def _reduce_shard(self, gradients, name):
        """This rank's shard of the summed gradient, bucket by bucket."""
        parts = []
        for bucket in self.layout.buffers[name].buckets:
            flat = self.layout.flat_range(gradients, name, bucket.start, bucket.stop)
            parts.append(self.comm.reduce_scatter(flat, bucket))
            if self.stage == 2:
                mx.eval(parts[-1])  # frees the flat bucket before the next one is built
        return parts[0] if len(parts) == 1 else mx.concatenate(parts)

    def _gather(self, shard, name):
        """The full flat buffer from every rank's updated shard."""
        parts, pos = [], 0
        for bucket in self.layout.buffers[name].buckets:
            n = bucket.counts[self.group.rank()]
            parts.append(self.comm.all_gather(shard[pos : pos + n], bucket))
            pos += n
        return parts[0] if len(parts) == 1 else mx.concatenate(parts)

    def _settings(self):
        """The optimizer's configuration, which must be equal on every rank."""
        plain = (int, float, bool, str, type(None))
        hyper = {
            k: (list(v) if isinstance(v, (list, tuple)) else v)
            for k, v in sorted(vars(self.inner).items())
            if not k.startswith("_") and (isinstance(v, plain) or isinstance(v, (list, tuple)))
        }
        lr = self.inner.learning_rate
        return {
            "optimizer": type(self.inner).__name__,
            "hyperparameters": hyper,
            "learning_rate": float(lr.item()) if lr.ndim == 0 else None,
            "schedules": sorted(self._schedulers),
            "stage": self.stage,
            "bucket_bytes": self.bucket_bytes,
            "shard_weights": list(self.shard_weights) if self.shard_weights else None,
        }

    def _check_ranks_agree(self):
        """Raise the same clear error on every rank if ranks hold different models or settings."""
        mine = {"parameters": self.layout.signature(), "settings": self._settings()}
        everyone = all_gather_object(mine, self.group)
        for rank, theirs in enumerate(everyone):
            problem = _first_difference(everyone[0], theirs)
            if problem:
                raise DistoptError(f"Rank {rank} differs from rank 0: {problem}. All ranks must build the same model and optimizer.")

    def consolidated_state(self):
        """The full optimizer state, laid out as the matching ``mlx.optimizers`` state (collective)."""
        if not self.sharded:
            return self.inner.state
        per_param = {}
        for name, shards in self._state["shards"].items():
            for key, shard in shards.items():
                for path, value in tree_flatten(self.layout.unflatten({name: self._gather(shard, name)})):
                    per_param.setdefault(path, {})[key] = value
        order = {p: i for i, p in enumerate(self.layout.paths)}
        state = tree_unflatten(sorted(per_param.items(), key=lambda kv: order[kv[0]]))
        return {**{k: v for k, v in self._state.items() if k != "shards"}, **state}

    def memory_report(self):
        """Bytes of optimizer state on this rank, and what one unsharded optimizer holds."""
        scalars = sum(v.nbytes for k, v in self._state.items() if isinstance(v, mx.array))
        if not self.sharded:
            total = sum(v.nbytes for _, v in tree_flatten(self.inner.state))
            return {"optimizer_state_bytes": total, "optimizer_state_bytes_unsharded": total, "world_size": 1}
        sharded = sum(v.nbytes for _, v in tree_flatten(self._state.get("shards", {})))
        unsharded = 0
        for name, shards in self._state.get("shards", {}).items():
            buf = self.layout.buffers[name]
            unsharded += sum(buf.size * v.dtype.size for v in shards.values())
        return {
            "optimizer_state_bytes": scalars + sharded,
            "optimizer_state_bytes_unsharded": scalars + unsharded,
            "parameter_bytes": sum(b.size * b.dtype.size for b in self.layout.buffers.values()),
            "gradient_shard_bytes": sum(b.shard_size(self.group.rank()) * b.dtype.size for b in self.layout.buffers.values()),
            "world_size": self.group.size(),
            "stage": self.stage,
        }


def _first_difference(reference, other):
    """A sentence naming the first difference between two ranks' descriptions, or ''."""
    ref_params = {p[0]: p for p in reference["parameters"]}
    other_params = {p[0]: p for p in other["parameters"]}
    for path in list(ref_params) + list(other_params):
        a, b = ref_params.get(path), other_params.get(path)
        if a is None:
            return f"it has parameter '{path}' that rank 0 lacks"
        if b is None:
            return f"it lacks parameter '{path}'"
        if a != b:
            return f"parameter '{path}' is {b[1]} {b[2]} there but {a[1]} {a[2]} on rank 0"
    for key, value in reference["settings"].items():
        if other["settings"].get(key) != value:
            return f"optimizer setting '{key}' is {other['settings'].get(key)!r} there but {value!r} on rank 0"
    return ""
