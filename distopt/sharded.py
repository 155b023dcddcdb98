"""The ZeRO step: reduce-scatter gradients, update this rank's shard, gather parameters.

``ShardedOptimizer`` wraps an element-wise ``mlx.optimizers`` optimizer. Every rank
keeps the optimizer state of its shard only (1/N of the model), and every rank
ends the step with the same full parameters, as plain data parallelism would give:

.. math::

    \\bar g = \\frac{1}{N}\\sum_{r} g_r, \\qquad
    w^{(r)}_{t+1} = \\text{update}(\\bar g^{(r)}, w^{(r)}_t, s^{(r)}_t), \\qquad
    w_{t+1} = \\text{all\\_gather}_r\\, w^{(r)}_{t+1}

where :math:`x^{(r)}` is rank r's shard of the flat buffer of x. The step runs bucket
by bucket: each bucket's gradient is reduced, its part updated and gathered on its own,
and :meth:`ShardedOptimizer.update` hands each bucket's new parameters to the model as
they arrive, so a step holds only the buckets in flight, never a whole-model copy. The
precision options (fp32 master shards, clipping, non-finite skip, loss scaling) live in
:mod:`distopt.precision`; with them off the step is exactly the one above.
"""

import collections
import contextlib
import functools
import itertools
import logging

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from . import precision, validate, watchdog
from .buffers import mlx_cache_limit
from .comm import Communicator, make_communicator
from .evaluation import traced
from .group import DistoptError, all_gather_object, init
from .layout import DEFAULT_BUCKET_BYTES, FlatLayout, Leaves, join, leaf_setter, new_leaves_held

# Optimizers whose update of an element depends on that element alone, so the
# update of a flat shard equals the update of every parameter in it.
ELEMENTWISE = (
    optim.SGD, optim.RMSprop, optim.Adagrad, optim.AdaDelta,
    optim.Adam, optim.AdamW, optim.Adamax, optim.Lion,
)  # fmt: skip
HYPER_KEYS = ("step", "learning_rate")
IN_FLIGHT = 3  # stage 1: buckets scheduled ahead of the one waited for (measured on 2xH200)
FEATURE_KEYS = ("grad_norm", "skipped_steps", "loss_scale", "loss_scale_good_steps")

log = logging.getLogger("distopt")


class ShardedOptimizer(optim.Optimizer):
    """Shard an element-wise MLX optimizer's state across the ranks of a group (ZeRO).

    Args:
        optimizer (mlx.optimizers.Optimizer): the optimizer to shard. Its update must
          be element-wise (SGD, RMSprop, Adagrad, AdaDelta, Adam, AdamW, Adamax,
          Lion); Adafactor and Muon mix elements of a parameter and are refused.
        group (mx.distributed.Group, optional): the ranks to shard over; default
          :func:`distopt.init`'s world group. With one rank the optimizer runs
          unchanged.
        stage (int): both stages shard the optimizer state and keep only this rank's
          part of the reduced gradient. Stage 1 lets up to 3 buckets be in flight
          (faster on a GPU); stage 2 finishes each bucket before the next (one bucket
          of working memory). Default ``1``.
        bucket_bytes (int): bytes per communication bucket. Default 256 MiB.
        shard_weights (list, optional): relative shard size per rank, e.g. the
          memory of each Mac. Equal shards by default.
        master_weights (bool): keep an fp32 master copy of this rank's shard of every
          bfloat16/float16 parameter, and fp32 optimizer state for it; the update runs
          in fp32 and parameters are gathered in the model's dtype. Default ``False``
          (state and update in the parameter's dtype, exactly as ``mlx.optimizers``).
        reduce_dtype (mlx.core.Dtype, optional): ``mlx.core.float32`` reduces half
          precision gradients in fp32 (twice the bytes). Default: the model's dtype.
        max_norm (float, optional): clip the global norm of the mean gradient to
          ``max_norm``, as ``mlx.optimizers.clip_grad_norm``; the norm before
          clipping is ``opt.last_grad_norm``. Default ``None`` (no clipping).
        skip_nonfinite (bool): skip the step on every rank when the mean gradient
          holds inf or NaN on any rank: parameters, state and ``step`` stay as they
          were, and ``opt.skipped_steps`` counts it. Default ``False``.
        loss_scale (float or DynamicLossScale, optional): the gradients are divided
          by ``opt.loss_scale``; multiply the loss by it. Implies
          ``skip_nonfinite``. Default ``None``.
        cache_step_buffers (bool): raise MLX's buffer cache limit (never lower it) to
          the bytes one step allocates (:meth:`step_buffer_bytes`), so that every step
          reuses the previous step's freed buffers instead of taking fresh memory from
          the OS. MLX's Linux CPU default keeps 32 MiB; a Mac's default (its memory
          limit) already covers it. Default ``True``; ``False`` leaves the limit alone.
        overlap_backward (bool): reduce the buckets last one first and schedule all
          their gradients before the first is reduced, so that unevaluated gradients
          (the usual MLX loop: ``opt.update(model, grads)`` straight after
          ``value_and_grad``) are reduced bucket by bucket while MLX computes the
          earlier layers' gradients, as PyTorch's DDP overlaps its all-reduce with the
          backward pass. It needs several buckets (``bucket_bytes`` below the model's
          size). Default ``True``; ``False``: layout order, each bucket's gradients
          evaluated when it is reduced.

    With one rank and none of the precision options, the inner optimizer runs
    unchanged; with any of them, the flat path runs with a single shard.

    State: ``state["shards"][dtype_name][key]`` is a list with this rank's part of every
    bucket, for every state key of the inner optimizer and, with master weights,
    ``"master"`` (fp32); :meth:`flat_shards` joins each list into one flat shard. The
    options add the 0-d arrays ``grad_norm``, ``skipped_steps``, ``loss_scale`` and
    ``loss_scale_good_steps`` at the top level when they use them. To compile the
    step, call ``init(model.trainable_parameters())`` first.
    """

    def __init__(
        self,
        optimizer,
        *,
        group=None,
        stage=1,
        bucket_bytes=DEFAULT_BUCKET_BYTES,
        shard_weights=None,
        master_weights=False,
        reduce_dtype=None,
        max_norm=None,
        skip_nonfinite=False,
        loss_scale=None,
        cache_step_buffers=True,
        overlap_backward=True,
    ):
        if not isinstance(optimizer, ELEMENTWISE):
            raise TypeError(
                f"{type(optimizer).__name__} is not element-wise, so its state cannot be sharded "
                f"by flat slices; supported: {', '.join(c.__name__ for c in ELEMENTWISE)}."
            )
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}.")
        validate.check_learning_rate(optimizer.state.get("learning_rate"))
        self.precision = precision.Precision(master_weights, reduce_dtype, max_norm, skip_nonfinite, loss_scale)
        super().__init__()
        self.inner = optimizer
        self.group = group if group is not None else init()
        self.stage = stage
        self.bucket_bytes = bucket_bytes
        self.shard_weights = shard_weights
        self.cache_step_buffers = cache_step_buffers
        self.overlap_backward = overlap_backward
        self.layout = None
        self._state = optimizer.state  # shares "step" and "learning_rate" with the inner optimizer
        self._schedulers = optimizer._schedulers
        self.comm = None
        self._kernel = mx.compile(self._update_shard)  # every output in one pass (GPU)
        self._kernels = {}  # one compiled kernel per output (CPU): see _update
        self._in_flight = collections.deque()
        self._stream = None  # the reduction's stream with overlap_backward: see _reduce_stream

    @property
    def sharded(self):
        """True when the flat, sharded step runs: several ranks, or any precision option.

        False only with a single rank and no precision option, where the inner
        optimizer runs unchanged with its own state layout.
        """
        return self.group.size() > 1 or self.precision.active

    @property
    def last_grad_norm(self):
        """The global norm of the last mean gradient (an array; ``None`` unless checked)."""
        return self.state.get("grad_norm")

    @property
    def skipped_steps(self):
        """How many steps were skipped for non-finite gradients."""
        return int(self.state["skipped_steps"].item()) if "skipped_steps" in self.state else 0

    @property
    def loss_scale(self):
        """The current loss scale (an array), or ``None`` without loss scaling."""
        return self.state.get("loss_scale")

    @property
    def state(self):
        """The optimizer state: ``step``, ``learning_rate`` and this rank's ``shards``, one
        array per bucket (or, unsharded, the inner optimizer's own state)."""
        return self._state if self.sharded else self.inner.state

    @property
    def learning_rate(self):
        """The current learning rate (an array); settable, as in ``mlx.optimizers``."""
        return self.state["learning_rate"]

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        validate.check_learning_rate(learning_rate)
        self.state["learning_rate"] = mx.array(learning_rate)

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
        self._init_flat(parameters, parameters)

    def _init_flat(self, tree, parameters):
        """Layout from ``tree``; state shards, and fp32 master shards copied from ``parameters``."""
        self.layout = FlatLayout(tree, self.group.size(), self.bucket_bytes, self.shard_weights)
        self._check_ranks_agree()
        if self.group.size() == 1:
            self.comm = SingleRankComm(self.group)
        else:
            self.comm = make_communicator(self.group, equal_parts=self.shard_weights is None)
        shards = self._state.setdefault("shards", {})
        for name, buf in self.layout.buffers.items():
            if name not in shards:
                shards[name] = self._fresh_state(buf)
        self._init_masters(parameters)
        for key, value in self.precision.init_state().items():
            self._state.setdefault(key, value)
        if self.cache_step_buffers:
            self._raise_cache_limit()
        self._initialized = True

    def _raise_cache_limit(self):
        """Let MLX keep the buffers of one step once freed (``mx.set_cache_limit``, never lowered).

        An MLX step cannot write into the previous step's arrays: the reduced gradient
        parts and the new parameters are new buffers every step. Freed buffers beyond
        MLX's cache limit go back to the OS, and fresh pages from Linux cost more than the
        step's arithmetic: MLP 100M, 2 ranks, MPI, MLX's default 32 MiB cache, 2.24 s per
        update against 0.73 s with them cached (README, "Step buffers and MLX's cache").
        """
        need, previous = self.step_buffer_bytes(), mlx_cache_limit()
        if previous < need:
            mx.set_cache_limit(need)
            log.info("distopt: MLX cache limit raised from %d to %d bytes (one step's buffers; cache_step_buffers=False keeps it)", previous, need)

    def step_buffer_bytes(self):
        """Bytes of the buffers one step allocates and frees (the MLX cache limit that
        ``cache_step_buffers`` sets): the flat gradient buckets in flight, the reduced
        gradient shard and what the update allocates (:meth:`memory_report`), with all
        the new parameters (the step allocates every one, if not all at once)."""
        if not self.sharded or self.layout is None:
            return 0
        report = self.memory_report()
        return report["reduce_buffer_bytes"] + report["gradient_shard_bytes"] + self._update_buffer_bytes(all_new=True)

    def _fresh_state(self, buf):
        """The inner optimizer's initial state for this rank's part of every bucket of ``buf``:
        ``{key: [part of bucket 0, part of bucket 1, ...]}``."""
        work, parts = self.precision.work_dtype(buf.dtype), []
        for bucket in buf.buckets:
            parts.append({})
            self.inner.init_single(mx.zeros((bucket.counts[self.group.rank()],), work), parts[-1])
        return {key: [part[key] for part in parts] for key in parts[0]}

    def _init_masters(self, parameters):
        """fp32 copies of this rank's shard of every half-precision buffer that lacks one."""
        for name, buf in self.layout.buffers.items():
            shard = self._state["shards"][name]
            if self.precision.has_master(buf.dtype) and "master" not in shard:
                parts = self.layout.shard_parts(parameters, name, self.group.rank())
                shard["master"] = [part.astype(mx.float32) for part in parts]

    def apply_gradients(self, gradients, parameters):
        """Average ``gradients`` over ranks, update this rank's shard, return full parameters."""
        if not self.sharded:
            return self.inner.apply_gradients(gradients, parameters)
        updated = [item for ready in self._step(gradients, parameters) for item in ready]
        return self.layout.tree(updated)

    def update(self, model, gradients):
        """Apply ``gradients`` to ``model``: ``model.update(opt.apply_gradients(gradients,
        model))``, as in ``mlx.optimizers``, but bucket by bucket. Each bucket's new
        parameters replace the old ones in the model as soon as they are gathered, so
        the old ones are freed then (unless something else holds them), not when the
        whole step is done: beyond the model the step holds the new parameters of one
        bucket, not of all of them. If a step fails part way (a rank lost), the model
        holds the new parameters of the buckets gathered so far, as the optimizer state
        holds their new state."""
        if not self.sharded:
            return super().update(model, gradients)
        place = leaf_setter(model, Leaves.of(gradients))  # a missing parameter raises here, before any collective
        for ready in self._step(gradients, model):
            for path, array in ready:
                place(path, array)

    def _step(self, gradients, parameters):
        """The ZeRO step; yields the ``(path, array)`` pairs of the new parameters as each
        bucket's are gathered."""
        if not self._initialized:
            self._init_lazily(gradients, parameters)
        gradients, parameters = Leaves.of(gradients), Leaves(Leaves.of(parameters))  # flattened once; ours to drop from
        self.layout.check_tree(gradients)
        watchdog.step_started()
        self.comm.traffic.start_step()
        self._in_flight.clear()  # nothing left over from a step that raised
        # 1. This rank's part of the summed (or already averaged) gradient, for every bucket of every dtype buffer.
        grads, divisors = self._reduced_parts(gradients)
        # 2. Unscale, global norm, clipping coefficient, "finite on every rank" flag.
        grads, coefficient, ok = self.precision.prepare(grads, self._state, self.group)
        self._advance_step(ok)
        hyper = {k: self._state[k] for k in HYPER_KEYS if k in self._state}
        for name in self.layout.buffers:
            # 3. Update each bucket's part (fp32 master if any), in the model's dtype; its gradient part is then dropped.
            divisor = divisors[name]
            parts = (self._update_part(name, b, hyper, taken(grads[name], b), parameters, coefficient, ok, divisor) for b in range(len(grads[name])))
            # 4. Gather the buckets into the new parameters as they arrive; the old ones are no longer read.
            for ready in self._gather_parameters(name, parts):
                self._settle([array for _, array in ready])
                for path, _ in ready:
                    parameters.pop(path, None)
                yield ready
        self._in_flight.clear()  # still running; the step's outputs hold what they need

    def _gather_parameters(self, name, parts):
        """For each bucket of buffer ``name``, gather every rank's updated ``parts`` and yield
        the ``(path, array)`` pairs of the new parameters that end in it: received straight
        into fresh parameter arrays where the communicator can (``tcp``), else cut out of
        the gathered buckets."""
        buckets = self.layout.buffers[name].buckets
        parts = iter(parts)
        first = next(parts)
        parts = itertools.chain([first], parts)
        if self.comm.gathers_into(first):
            leaves = self.layout.new_leaves(name)
            for bucket, part in zip(buckets, parts):
                mx.eval(part)  # first: its gradient part is freed before the bucket's new leaves are allocated
                self.comm.all_gather_into(part, bucket, leaves.views(bucket))
                yield leaves.finished(bucket)
        else:
            yield from self.layout.unflatten_buckets(name, (self.comm.all_gather(p, b) for b, p in zip(buckets, parts)))

    def _update_part(self, name, b, hyper, grad, parameters, coefficient, ok, divisor=None):
        """Update this rank's part of bucket ``b`` of buffer ``name``; return the new part in
        the model's dtype. A non-finite step changes nothing."""
        buf, shard = self.layout.buffers[name], self._state["shards"][name]
        bucket = buf.buckets[b]
        state = {key: parts[b] for key, parts in shard.items() if key != "master"}
        if "master" in shard:
            param = shard["master"][b]
        else:
            param = self.layout.flat_range(parameters, name, *bucket.part(self.group.rank()))
        param, new_state = self._update(hyper, grad, param, state, coefficient, ok, divisor)
        for key, value in new_state.items():
            shard[key][b] = value
        if "master" in shard:
            shard["master"][b] = param
        del state  # the old arrays are now the kernels' inputs only: theirs to write into
        if self._kernels and not traced(param):  # evaluates the parameter part, which reads the old
            mx.async_eval(list(new_state.values()))  # state, first; these kernels then write into it
            # (scheduled together, the parameter kernel's reference sometimes outlives its run)
        return param.astype(buf.dtype)

    def _update(self, hyper, grad, param, state, coefficient, ok, divisor):
        """``(new parameter part, new state)`` by :meth:`_update_shard`, compiled.

        On a GPU, and inside ``mx.compile`` (where the whole step is one graph), one
        kernel computes every output: the fewest bytes moved. On the CPU, one kernel per
        output, each recomputing what it needs: MLX gives a kernel of several outputs
        fresh buffers (its inputs are not donated to them), and fresh memory from Linux
        made the update 3x slower (Adamax on a 50M-element shard, MLX's default cache:
        430-456 ms fused, 131-140 ms one kernel per output, which writes into the old
        array's buffer; 123-139 ms both with an 8 GiB cache; the same bits). In the step
        (MLP 100M, 2 ranks, MPI): 1.72-1.83 s against 2.45 s (README, "Update kernels").
        """
        args = (hyper, grad, param, state, coefficient, ok, divisor)
        if mx.default_device() != mx.cpu or traced(grad):
            return self._kernel(*args)
        return self._update_per_output(*args)

    def _update_per_output(self, hyper, grad, param, state, coefficient, ok, divisor):
        """:meth:`_update_shard` as one compiled kernel per output (compiled once per key)."""
        args = (hyper, grad, param, state, coefficient, ok, divisor)
        for key in (None, *state):
            if key not in self._kernels:
                self._kernels[key] = mx.compile(functools.partial(self._one_output, key))
        return self._kernels[None](*args), {key: self._kernels[key](*args) for key in state}

    def _one_output(self, key, *args):
        """The new parameter part (``key`` None) or state array ``key`` of :meth:`_update_shard`."""
        param, state = self._update_shard(*args)
        return param if key is None else state[key]

    def _init_lazily(self, gradients, parameters):
        """``init`` on the first step, which ``mx.compile`` cannot trace (it talks to other ranks)."""
        validate.check_gradients(gradients, parameters)
        first = next((v for _, v in tree_flatten(gradients) if isinstance(v, mx.array)), None)
        if first is not None and traced(first):
            raise DistoptError(
                "The optimizer must be initialized before its step is compiled: call "
                "opt.init(model.trainable_parameters()) before mx.compile(...)."
            )
        self._init_flat(gradients, parameters)

    def _advance_step(self, ok=None):
        """Schedules and step counter, exactly as ``mlx.optimizers.Optimizer``; a skipped step keeps both."""
        for param, scheduler in self._schedulers.items():
            self._state[param] = scheduler(self.step)
        self._state["step"] = precision.select(ok, self.step + 1, self.step)

    def _update_shard(self, hyper, grad, param, state, coefficient=None, ok=None, divisor=None):
        """The inner optimizer's element-wise math on one flat shard (compiled once per shape),
        on ``mean(grad, divisor)`` when ``grad`` is still the sum over ``divisor`` ranks."""
        saved, self.inner._state = self.inner._state, hyper
        try:
            if divisor is not None:
                grad = mean(grad, divisor, param.dtype)
            new_state = dict(state)
            new_param = self.inner.apply_single(precision.clip(grad, coefficient), param, new_state)
            return precision.select(ok, new_param, param), precision.select(ok, new_state, state)
        finally:
            self.inner._state = saved

    def _reduced_parts(self, gradients):
        """This rank's part of every bucket of the gradient reduced over ranks, per buffer
        (``{name: [part of bucket 0, ...]}``), and the divisor each buffer's update still
        has to apply (:meth:`_divisor`).

        With ``overlap_backward`` the buckets go last one first, the order in which the
        backward pass finishes their gradients, and every bucket's gradients are
        scheduled (``mx.async_eval``) before the first is reduced: while one bucket is
        on the wire, MLX computes the gradients of the earlier layers. That matters when
        ``gradients`` arrive unevaluated, as in the usual MLX loop; evaluated ones are
        only reduced in that order. Without it, buckets go in layout order, each
        evaluated when it is reduced.
        """
        buffers = self.layout.buffers
        order = [(name, b) for name, buf in buffers.items() for b in range(len(buf.buckets))]
        stream = contextlib.nullcontext()
        if self.overlap_backward:
            order.reverse()
            if self._schedule_gradients(gradients, order):
                stream = mx.stream(self._reduce_stream())
        parts = {name: [None] * len(buf.buckets) for name, buf in buffers.items()}
        divisors = {name: self._divisor(buf) for name, buf in buffers.items()}
        with stream:
            for name, b in order:
                parts[name][b] = self._reduced_part(gradients, name, buffers[name].buckets[b], divisors[name])
                self._settle(parts[name][b])  # frees the flat bucket before the next ones pile up
        self._in_flight.clear()  # each update waits for its part; held here, a part would outlive its update
        return parts, divisors

    def _schedule_gradients(self, gradients, order):
        """Start computing the gradient leaves of each bucket, in ``order`` (``mx.async_eval``);
        True if scheduled. Not where the collectives stay in the graph (GPU backends), nor
        under ``mx.compile``."""
        if self.comm.lazy:
            return False
        for name, b in order:
            if traced(self.layout.bucket_leaves(gradients, name, self.layout.buffers[name].buckets[b]), wait=False):
                return False
        return True

    def _reduce_stream(self):
        """A stream of its own for the MLX work of the reduction (receive buffers, joins), so it
        does not queue behind the scheduled backward pass on the default stream (one queue:
        a receive buffer's zero fill would wait for every gradient)."""
        if self._stream is None:
            self._stream = mx.new_stream(mx.default_device())
        return self._stream

    def _divisor(self, buf):
        """``N`` when the reduced parts of ``buf`` are the sum over ranks, left for the
        compiled update to divide (one pass over the part fewer); ``None`` when they are
        already the mean, in the update's dtype: the precision checks need the mean first,
        or the division changes the dtype."""
        work, reduce_dtype = self.precision.work_dtype(buf.dtype), self.precision.reduce_dtype
        if self.precision.checks or (reduce_dtype or buf.dtype) != work:
            return None
        return self.group.size()

    def _reduced_part(self, gradients, name, bucket, divisor):
        """This rank's part of ``bucket`` of buffer ``name``, reduced over ranks: the sum
        (``divisor`` N) or the mean in the update's dtype (``divisor`` None)."""
        buf, reduce_dtype = self.layout.buffers[name], self.precision.reduce_dtype
        if self.comm.reads_segments and reduce_dtype is None:
            total = self.comm.reduce_scatter_segments(self.layout.part_segments(gradients, name, bucket), bucket)
        else:
            pieces = self.layout.flat_pieces(gradients, name, bucket.start, bucket.stop)
            if reduce_dtype is not None:
                pieces = [join(pieces).astype(reduce_dtype)]
            total = self.comm.reduce_scatter_pieces(pieces, bucket)
        return total if divisor else mean(total, self.group.size(), self.precision.work_dtype(buf.dtype))

    def _settle(self, arrays):
        """Start computing a bucket's ``arrays`` now, so its inputs are freed before many
        more buckets are built. Stage 2 waits for them: one bucket in flight. Stage 1
        schedules them (``mx.async_eval``, which keeps a GPU's queue full) and waits only
        for the bucket scheduled ``IN_FLIGHT - 1`` settles before: at most ``IN_FLIGHT``
        buckets in flight; a model of at most ``IN_FLIGHT`` buckets never waits (all of
        them in flight is what :meth:`memory_report` counts anyway). Inside ``mx.compile``
        nothing can be evaluated, and the compiled graph is left as is."""
        if self.stage == 2:
            traced(arrays)  # evaluates them, except under mx.compile
            return
        if traced(arrays, wait=False):
            return
        self._in_flight.append(arrays)
        if len(self._in_flight) >= IN_FLIGHT and self.layout.bucket_count > IN_FLIGHT:
            mx.eval(self._in_flight.popleft())

    def _gather(self, parts, name):
        """The full flat buffer ``name`` from every rank's per-bucket ``parts`` (consolidation)."""
        buckets = self.layout.buffers[name].buckets
        return join([self.comm.all_gather(part, bucket) for part, bucket in zip(parts, buckets)])

    def flat_shards(self):
        """This rank's state as one flat shard per key: ``{dtype_name: {key: array}}``
        (its parts of the buckets joined, as a checkpoint stores them)."""
        return {name: {key: join(parts) for key, parts in keys.items()} for name, keys in self._state.get("shards", {}).items()}

    def load_flat_shards(self, shards):
        """Set this rank's state from flat shards laid out as :meth:`flat_shards` gives them.
        The state's lists are filled in place (a compiled step may hold them)."""
        for name, keys in shards.items():
            starts, current = self.layout.buffers[name].part_starts(self.group.rank()), self._state["shards"][name]
            for key, flat in keys.items():
                current.setdefault(key, [])[:] = [flat[lo:hi] for lo, hi in zip(starts, starts[1:])]

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
            "overlap_backward": self.overlap_backward,  # the order of the buckets' collectives
            "shard_weights": list(self.shard_weights) if self.shard_weights else None,
            "precision": self.precision.settings(),
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
                if key == "master":
                    continue
                for path, value in tree_flatten(self.layout.unflatten({name: self._gather(shard, name)})):
                    per_param.setdefault(path, {})[key] = value
        order = {p: i for i, p in enumerate(self.layout.paths)}
        state = tree_unflatten(sorted(per_param.items(), key=lambda kv: order[kv[0]]))
        hyper = {k: v for k, v in self._state.items() if k != "shards" and k not in FEATURE_KEYS}
        return {**hyper, **state}

    def master_parameters(self):
        """The fp32 master copies of the half-precision parameters, full, on every rank (collective)."""
        full = {}
        for name, shards in self._state.get("shards", {}).items():
            if "master" in shards:
                full[name] = self._gather(shards["master"], name)
        return self.layout.unflatten(full) if full else {}

    def comm_report(self):
        """Bytes this rank sent and received in the last step, per operation, and in total.

        ``flat_bytes`` is the size of the padded flat buffers; every path but
        ``allsum`` moves ``2 (N-1)/N`` of it per step with equal shards.
        """
        if self.comm is None:
            return {"path": None, "world_size": self.group.size(), "steps": 0}
        t = self.comm.traffic
        return {
            "path": self.comm.name,
            "world_size": self.group.size(),
            "steps": t.steps,
            "flat_bytes": sum(b.padded_size * b.dtype.size for b in self.layout.buffers.values()),
            "step_sent": dict(t.step_sent),
            "step_received": dict(t.step_received),
            "total_sent": t.total_sent(),
            "total_received": t.total_received(),
        }

    def memory_report(self):
        """Bytes this rank holds for training, by kind (see :func:`distopt.plan` for the model).

        ``parameter_bytes`` and ``gradient_bytes``: the full model and its local
        gradients, in the model's dtype. ``master_weight_bytes``: this rank's fp32
        master shards. ``optimizer_state_bytes``: its state shards plus the scalars
        (``optimizer_state_bytes_unsharded``: what one unsharded optimizer holds).
        ``gradient_shard_bytes``: the mean gradient shard. ``reduce_buffer_bytes``:
        the flat gradient buckets being reduced: the ``IN_FLIGHT`` (3) largest at
        stage 1, the largest one at stage 2. ``update_buffer_bytes``: what the update allocates
        while the old arrays are still alive (the new parameters of the buckets being
        gathered, :func:`~distopt.layout.new_leaves_held`, and per bucket in flight, the
        new state and parameter parts, the part in the model's dtype and the gathered
        bucket, which the ``tcp`` and ``mpi4py-ring`` paths do not allocate: they gather
        into the new parameters). This is the step of :meth:`update`; ``apply_gradients``
        holds all the new parameters until it returns. ``total_bytes``:
        their sum, the expected peak of a step without activations.
        """
        scalars = sum(v.nbytes for k, v in self._state.items() if isinstance(v, mx.array))
        if not self.sharded:
            total = sum(v.nbytes for _, v in tree_flatten(self.inner.state))
            return {"optimizer_state_bytes": total, "optimizer_state_bytes_unsharded": total, "world_size": 1}
        rank, buffers, shards = self.group.rank(), self.layout.buffers, self._state.get("shards", {})
        state = sum(v.nbytes for s in shards.values() for k, parts in s.items() if k != "master" for v in parts)
        master = sum(v.nbytes for s in shards.values() for v in s.get("master", []))
        unsharded = sum(buffers[name].size * v[0].dtype.size for name, s in shards.items() for k, v in s.items() if k != "master")
        reduce_size = lambda b: (self.precision.reduce_dtype or b.dtype).size  # noqa: E731
        buckets = [(bk.stop - bk.start) * reduce_size(b) for b in buffers.values() for bk in b.buckets]
        report = {
            "parameter_bytes": sum(b.size * b.dtype.size for b in buffers.values()),
            "gradient_bytes": sum(b.size * b.dtype.size for b in buffers.values()),
            "master_weight_bytes": master,
            "optimizer_state_bytes": scalars + state,
            "gradient_shard_bytes": sum(b.shard_size(rank) * self.precision.work_dtype(b.dtype).size for b in buffers.values()),
            "reduce_buffer_bytes": in_flight(buckets, self.stage),
            "update_buffer_bytes": self._update_buffer_bytes(),
        }
        report["total_bytes"] = sum(report.values())
        report.update(optimizer_state_bytes_unsharded=scalars + unsharded, world_size=self.group.size(), stage=self.stage)
        return report

    def _update_buffer_bytes(self, all_new=False):
        """What the update allocates while the old arrays live: per bucket, the new state
        and parameter parts, the part in the model's dtype and the gathered bucket (for
        the ``IN_FLIGHT`` largest buckets at stage 1, the largest at stage 2); plus the new
        parameters held beside the old ones (:func:`~distopt.layout.new_leaves_held`;
        ``all_new``: all of them, as ``apply_gradients`` holds them and as one step
        allocates them). Where the communicator gathers into the new parameters (``tcp``,
        ``mpi4py-ring``) there is no gathered bucket, and every leaf is a fresh array."""
        rank, per_bucket, new_parameters = self.group.rank(), [], 0
        into = self.comm.gathers_into_leaves
        for name, buf in self.layout.buffers.items():
            keys, work = self._state["shards"][name], self.precision.work_dtype(buf.dtype).size
            for b, bucket in enumerate(buf.buckets):
                c = bucket.counts[rank]
                new_state = sum(parts[b].nbytes for key, parts in keys.items() if key != "master")
                gathered = 0 if into else (bucket.stop - bucket.start) * buf.dtype.size
                per_bucket.append(new_state + c * work + c * buf.dtype.size + gathered)
            if all_new:
                new_parameters += buf.size * buf.dtype.size if into or len(buf.buckets) > 1 else 0
            else:
                new_parameters += new_leaves_held(buf.sizes, buf.buckets, into) * buf.dtype.size
        return new_parameters + in_flight(per_bucket, self.stage)


def taken(items, i):
    """``items[i]``, its place in ``items`` set to None: the list no longer holds it, so it
    is freed once its consumer is done with it (no local name holds it either)."""
    item, items[i] = items[i], None
    return item


def mean(total, n, work):
    """``total / n`` in the update's dtype ``work``; divided in fp32 when the update runs in fp32."""
    if work == mx.float32:
        total = total.astype(mx.float32)
    return (total / n).astype(work)


def in_flight(per_bucket, stage):
    """Bytes of the buckets that can be in flight at once: the ``IN_FLIGHT`` largest at
    stage 1, the largest at stage 2, all of them for ``stage=None`` (an unsharded update
    of everything at once, as ``mlx.optimizers`` runs it)."""
    return sum(sorted(per_bucket, reverse=True)[: {1: IN_FLIGHT, 2: 1}.get(stage)])


class SingleRankComm(Communicator):
    """The communicator of a one-rank group: the sum over one rank is the buffer itself."""

    name = "single"

    def reduce_scatter(self, flat, bucket):
        """``flat`` itself: the sum over one rank."""
        return flat

    def all_gather(self, part, bucket):
        """``part`` itself: the whole buffer."""
        return part


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
        theirs = other["settings"].get(key)
        if theirs != value and isinstance(value, dict) and isinstance(theirs, dict):  # name the hyperparameter
            key = next(k for k in {**value, **theirs} if value.get(k) != theirs.get(k))
            value, theirs = value.get(key), theirs.get(key)
        if theirs != value:
            return f"optimizer setting '{key}' is {theirs!r} there but {value!r} on rank 0"
    return ""
