"""The memory model: bytes per rank for a model, an optimizer, a dtype and N ranks.

For a flat buffer of :math:`P` parameters of :math:`s` bytes each, padded to
:math:`\\hat P = N \\lceil P / N \\rceil` and sharded into :math:`\\hat P / N` elements per
rank, an optimizer with :math:`k` state arrays per parameter holds on every rank

.. math::

    \\underbrace{P s}_{\\text{parameters}} + \\underbrace{P s}_{\\text{gradients}}
    + \\underbrace{4 \\hat P / N}_{\\text{fp32 master}}
    + \\underbrace{k\\, w \\hat P / N}_{\\text{state}}
    + \\underbrace{w \\hat P / N}_{\\text{mean gradient shard}}
    + \\underbrace{R}_{\\text{reduce buffers}}
    + \\underbrace{L s + \\textstyle\\sum_{b \\in F}
      \\big((k + 1)\\, w\\, c_b + s\\, c_b + g\\, s\\, B_b\\big)}_{\\text{update buffers}}

where :math:`w` is 4 with master weights on a half-precision model and :math:`s`
otherwise. A step works bucket by bucket, and :math:`F` is the set of buckets that can
be in flight at once: the ``IN_FLIGHT`` (3) largest at stage 1, the largest at stage 2.
The reduce buffers :math:`R` are the flat gradient buckets of :math:`F`. The update
buffers are what the update allocates before the old arrays go: per bucket :math:`b` of
:math:`B_b` elements, of which this rank owns :math:`c_b`, the new state and parameter
(or master) parts, the part in the model's dtype and the gathered bucket (:math:`g = 1`
on NCCL/JACCL); plus the new parameters held beside the old ones (:math:`L s`):
:meth:`ShardedOptimizer.update` hands each bucket's to the model once it is gathered,
so :math:`L` is the largest bucket's share (:func:`~distopt.layout.new_leaves_held`: the
leaves a bucket's gather overlaps, or, cut out of gathered buckets, those that end in
it; a one-bucket buffer's are views of it, none). Without the leaves (a parameter count)
they are taken to be as large as the buckets. On the ring and MPI backends the default
paths (``tcp``, ``mpi4py-ring``) gather straight into the new parameters: no gathered
bucket (:math:`g = 0`). With no sharding every new parameter is held (:math:`L = P`, as
``apply_gradients`` holds them). The sum is the peak of a step, less
activations. With shard weights, rank r's part of every bucket sets :math:`c_b`. These
are exactly the figures of :meth:`ShardedOptimizer.memory_report`.
"""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from .comm import gathers_into_leaves_by_default
from .layout import DEFAULT_BUCKET_BYTES, cut_buckets, dtype_name, new_leaves_held
from .precision import Precision
from .sharded import ELEMENTWISE, ShardedOptimizer, in_flight

DTYPES = {
    "float32": mx.float32, "fp32": mx.float32, "f32": mx.float32,
    "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
    "float16": mx.float16, "fp16": mx.float16, "f16": mx.float16,
}  # fmt: skip
KINDS = (
    ("parameter_bytes", "parameters"),
    ("gradient_bytes", "gradients"),
    ("master_weight_bytes", "master weights (fp32)"),
    ("optimizer_state_bytes", "optimizer state"),
    ("gradient_shard_bytes", "mean gradient shard"),
    ("reduce_buffer_bytes", "reduce buffers"),
    ("update_buffer_bytes", "update buffers"),
    ("total_bytes", "peak per rank"),
)
GiB = 1024**3
BACKENDS = ("ring", "mpi", "jaccl", "nccl")


def plan(
    model_or_param_count,
    optimizer="adamax",
    dtype=None,
    world_size=1,
    memory_gb=None,
    *,
    master_weights=False,
    reduce_dtype=None,
    max_norm=None,
    skip_nonfinite=False,
    loss_scale=None,
    bucket_bytes=DEFAULT_BUCKET_BYTES,
    shard_weights=None,
    usable_fraction=0.75,
    backend="ring",
):
    """Bytes per rank to train a model with a sharded optimizer, at stage 1 and 2.

    Args:
        model_or_param_count: an ``mlx.nn.Module``, a tree of parameters, a number
          of parameters (e.g. ``7e9``), or ``{dtype: count}`` (e.g. from
          :func:`safetensors_sizes`, to plan a checkpoint without loading it).
        optimizer: a name (``"adamax"``, ``"adam"``, ``"sgd"``, ...), an
          ``mlx.optimizers`` optimizer or a :class:`ShardedOptimizer`.
        dtype: the parameters' dtype (``"bfloat16"``, ``"bf16"``, ``mx.float16``, ...).
          Default: the model's own dtypes, or bfloat16 for a parameter count.
        world_size (int): the number of ranks N.
        memory_gb (float or list, optional): each machine's memory in GiB (one number
          for all, or one per rank).
        master_weights, reduce_dtype, max_norm, skip_nonfinite, loss_scale,
          bucket_bytes, shard_weights: as for :class:`ShardedOptimizer`;
          ``shard_weights="memory"`` sizes shards by ``memory_gb``.
        usable_fraction (float): share of a machine's memory training may use (macOS
          lets the GPU wire about 75% of it). Default ``0.75``.
        backend (str): ``"ring"`` (default), ``"mpi"``, ``"jaccl"`` or ``"nccl"``: whether
          the all-gather lands in the new parameters (ring, MPI) or in a gathered
          bucket first (JACCL, NCCL; also any ``DISTOPT_COMM`` other than the default).

    Returns:
        dict: ``parameters``, ``world_size``, ``optimizer``, ``state_arrays``, and under
        ``"stages"`` the keys ``"unsharded"`` (one rank, no sharding), ``1`` and ``2``,
        each a dict of the byte counts of :meth:`ShardedOptimizer.memory_report` for
        the rank with the largest shard, ``ranks`` (one such dict per rank) and
        ``fits`` (a bool per rank, or ``None`` without ``memory_gb``).
    """
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}.")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}.")
    memory = _memory_per_rank(memory_gb, world_size)
    weights = _shard_weights(shard_weights, memory, world_size)
    sizes, leaves = _buffer_sizes(model_or_param_count, dtype), _leaf_sizes(model_or_param_count, dtype)
    slots = _state_arrays(optimizer)
    options = Precision(master_weights, reduce_dtype, max_norm, skip_nonfinite, loss_scale)
    stages = {"unsharded": _stage(sizes, [1], None, slots, options, bucket_bytes, False)}
    for stage in (1, 2):
        stages[stage] = _stage(sizes, weights, stage, slots, options, bucket_bytes, gathers_into_leaves_by_default(backend), leaves)
    budget = [usable_fraction * m * GiB for m in memory] if memory else None
    for figures in stages.values():
        totals = [r["total_bytes"] for r in figures["ranks"]]
        totals = totals * world_size if len(totals) == 1 else totals  # "unsharded": every rank holds it all
        figures["fits"] = [t <= b for t, b in zip(totals, budget)] if budget else None
    return {
        "parameters": sum(sizes.values()),
        "dtypes": [dtype_name(d) for d in sizes],
        "world_size": int(world_size),
        "optimizer": _optimizer_name(optimizer),
        "state_arrays": slots,
        "master_weights": master_weights,
        "memory_gb": memory,
        "shard_weights": None if shard_weights is None else list(weights),
        "usable_fraction": usable_fraction,
        "backend": backend,
        "stages": stages,
    }


def _stage(sizes, weights, stage, slots, options, bucket_bytes, into, leaves=None):
    """Every rank's figures, and the largest rank's at the top level."""
    ranks = _bytes(sizes, weights, stage, slots, options, bucket_bytes, into, leaves)
    largest = max(ranks, key=lambda r: r["total_bytes"])
    return {**largest, "ranks": ranks}


def _bytes(sizes, weights, stage, slots, options, bucket_bytes, into, leaves=None):
    """The :meth:`ShardedOptimizer.memory_report` figures of every rank, from the formula;
    ``into``: the all-gather lands in the new parameters (no gathered bucket); ``leaves``:
    ``{dtype: [leaf sizes, in order]}`` of a real model, if known; ``stage`` None: one
    rank, no sharding."""
    n = len(weights)
    out = [{key: 0 for key, _ in KINDS[:-1]} for _ in range(n)]
    reduce_buckets, per_bucket = [], [[] for _ in range(n)]
    for dtype, size in sizes.items():
        work = options.work_dtype(dtype).size
        reduce = (options.reduce_dtype or dtype).size
        _, cut = cut_buckets(size, dtype.size, weights, bucket_bytes)
        buckets = [b.stop - b.start for b in cut]
        reduce_buckets += [b * reduce for b in buckets]
        for r, figures in enumerate(out):
            parts = [b.counts[r] for b in cut]
            shard = sum(parts)
            figures["parameter_bytes"] += size * dtype.size
            figures["gradient_bytes"] += size * dtype.size
            figures["master_weight_bytes"] += shard * 4 if options.has_master(dtype) else 0
            figures["optimizer_state_bytes"] += slots * shard * work
            figures["gradient_shard_bytes"] += shard * work
            # New state and parameter parts, the part in the model's dtype, the gathered bucket.
            gathered = 0 if into else dtype.size
            per_bucket[r] += [(slots + 1) * c * work + c * dtype.size + b * gathered for c, b in zip(parts, buckets)]
            # New parameters held beside the old ones: unsharded, all of them (cut out of several buckets;
            # one bucket's are views of it); sharded, those of the bucket being gathered (update() hands
            # each bucket's to the model). Without the leaves (a count), leaves as large as the buckets.
            if stage is None:
                figures["update_buffer_bytes"] += size * dtype.size if into or len(buckets) > 1 else 0
            else:
                sizes_of = leaves.get(dtype) if leaves else [min(b.stop, size) - b.start for b in cut]
                figures["update_buffer_bytes"] += new_leaves_held(sizes_of, cut, into) * dtype.size
    for figures, transient in zip(out, per_bucket):
        figures["optimizer_state_bytes"] += _scalar_bytes(options)
        figures["reduce_buffer_bytes"] = in_flight(reduce_buckets, stage)
        figures["update_buffer_bytes"] += in_flight(transient, stage)
        figures["total_bytes"] = sum(figures.values())
    return out


def _scalar_bytes(options):
    """``step`` (uint64), ``learning_rate`` (float32) and the precision options' scalars."""
    return 8 + 4 + sum(v.nbytes for v in options.init_state().values())


def _buffer_sizes(source, dtype):
    """``{dtype: number of parameters}`` of a model, a parameter tree or a count."""
    cast = _dtype(dtype) if dtype is not None else None
    if _is_count(source):
        if isinstance(source, dict):
            return {cast: sum(source.values())} if cast else dict(source)  # {dtype: count}, e.g. safetensors_sizes
        if source < 1 or source != int(source):
            raise ValueError(f"The parameter count must be a positive whole number, got {source!r}.")
        return {cast or mx.bfloat16: int(source)}
    sizes = {key: sum(leaves) for key, leaves in _leaf_sizes(source, dtype).items()}
    if not sizes:
        raise ValueError("The model has no trainable parameters: there is nothing to plan.")
    return sizes


def _leaf_sizes(source, dtype):
    """``{dtype: [leaf sizes, in tree order]}`` of a model or parameter tree; None for a count."""
    if _is_count(source):
        return None
    cast = _dtype(dtype) if dtype is not None else None
    tree = source.trainable_parameters() if isinstance(source, nn.Module) else source
    leaves = {}
    for _, leaf in tree_flatten(tree):
        if isinstance(leaf, mx.array):
            leaves.setdefault(cast or leaf.dtype, []).append(leaf.size)
    return leaves


def _is_count(source):
    """A parameter count: a number, or ``{dtype: count}``."""
    return isinstance(source, (int, float)) or (isinstance(source, dict) and bool(source) and all(isinstance(k, mx.Dtype) for k in source))


SAFETENSORS_DTYPES = {"F32": mx.float32, "BF16": mx.bfloat16, "F16": mx.float16}


def safetensors_sizes(paths):
    """``{dtype: number of parameters}`` read from the headers of safetensors files.

    Only each file's JSON header is read (its first ``8 + n`` bytes), so a model of any
    size is planned without loading it. A directory means all its ``*.safetensors``.
    """
    files = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"No .safetensors files in {', '.join(map(str, paths))}.")
    sizes = {}
    for file in files:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= 100 * 1024**2:
                raise ValueError(f"{file} is not a safetensors file (header length {length}).")
            try:
                header = json.loads(f.read(length))
            except ValueError:
                raise ValueError(f"{file} is not a safetensors file (its header is not JSON).") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"{file}: tensor '{name}' has dtype {info.get('dtype')!r}; expected F32, BF16 or F16.")
            sizes[dtype] = sizes.get(dtype, 0) + math.prod(info["shape"])
    return sizes


def _dtype(dtype):
    if isinstance(dtype, mx.Dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {', '.join(sorted(DTYPES))}.")
    return DTYPES[str(dtype).lower()]


def _inner(optimizer):
    """The ``mlx.optimizers`` instance behind a name, an MLX optimizer or a ShardedOptimizer."""
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer.inner
    if isinstance(optimizer, optim.Optimizer):
        return optimizer
    by_name = {cls.__name__.lower(): cls for cls in ELEMENTWISE}
    cls = by_name.get(str(optimizer).lower())
    if cls is None:
        raise ValueError(f"Unknown optimizer {optimizer!r}; expected one of {', '.join(sorted(by_name))}.")
    return cls(learning_rate=0.1)


def _optimizer_name(optimizer):
    return type(_inner(optimizer)).__name__


def _state_arrays(optimizer):
    """How many state arrays per parameter the optimizer keeps (Adamax: m and v, so 2)."""
    state = {}
    _inner(optimizer).init_single(mx.zeros((1,)), state)
    return len(state)


def _shard_weights(shard_weights, memory, world_size):
    if shard_weights is None:
        return [1] * world_size
    if isinstance(shard_weights, str) and shard_weights == "memory":
        if memory is None:
            raise ValueError('shard_weights="memory" needs memory_gb.')
        return memory
    if len(shard_weights) != world_size or min(shard_weights) <= 0:
        raise ValueError(f"shard_weights must be {world_size} positive numbers, one per rank; got {shard_weights!r}.")
    return list(shard_weights)


def _memory_per_rank(memory_gb, world_size):
    if memory_gb is None:
        return None
    memory = list(memory_gb) if isinstance(memory_gb, (list, tuple)) else [memory_gb] * world_size
    if len(memory) == 1:
        memory = memory * world_size
    if len(memory) != world_size or min(memory) <= 0:
        raise ValueError(f"memory_gb must be one positive number or {world_size} of them, one per rank; got {memory_gb!r}.")
    return [float(m) for m in memory]


def format_plan(result):
    """A text table of a :func:`plan` result, one column per stage."""
    stages = result["stages"]
    columns = [("no sharding", stages["unsharded"]), ("stage 1", stages[1]), ("stage 2", stages[2])]
    master = "on" if result["master_weights"] else "off"
    lines = [
        f"{result['parameters']:.3g} parameters ({', '.join(result['dtypes'])}), {result['optimizer']} "
        f"({result['state_arrays']} state arrays), {result['world_size']} ranks, master weights {master}, "
        f"backend {result['backend']}",
        f"{'bytes per rank':<24}" + "".join(f"{name:>14}" for name, _ in columns),
    ]
    unequal = len({r["total_bytes"] for r in stages[1]["ranks"]}) > 1
    if unequal:
        lines[0] += f", shards weighted {_gib_list(result['shard_weights'])}"
        lines[1] = f"{'largest rank':<24}" + lines[1][24:]
    for key, label in KINDS:
        lines.append(f"{label:<24}" + "".join(f"{_human(figures[key]):>14}" for _, figures in columns))
    if result["memory_gb"]:
        memory = result["memory_gb"]
        usable = f"{result['usable_fraction']:.0%} of {_gib_list(memory)} GiB"
        lines.append(f"{'fits (' + usable + ')':<24}" + "".join(f"{_fits(f['fits']):>14}" for _, f in columns))
    if unequal:
        for stage in (1, 2):
            totals = ", ".join(_human(r["total_bytes"]) for r in stages[stage]["ranks"])
            lines.append(f"stage {stage} total by rank: {totals}")
    lines.append("Activations are not included; they grow with the batch and sequence length.")
    return "\n".join(lines)


def _fits(flags):
    if all(flags):
        return "yes"
    return "no" if not any(flags) else "ranks " + ",".join(str(i) for i, ok in enumerate(flags) if ok)


def _gib_list(memory):
    unique = sorted(set(memory))
    return f"{unique[0]:g}" if len(unique) == 1 else "/".join(f"{m:g}" for m in memory)


def _human(n):
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}"
    return f"{n}"

