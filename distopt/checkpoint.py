"""Save and load checkpoints of a model and its (sharded) optimizer, at any world size.

``save_checkpoint`` is collective: every rank writes its own optimizer shard in
parallel, rank 0 also writes the plain model weights, then rank 0 records every file's
sha256 in the manifest and publishes the checkpoint with one atomic rename (see
:mod:`distopt.ckptdir`). ``load_checkpoint`` is collective too: every rank validates the
manifest against its model and optimizer, checks the files it needs, and builds its
new shard from the saved shards by flat position, so a checkpoint saved by N ranks
loads on any M. Ranks agree on success before anything is changed, so a bad checkpoint
raises the same :class:`CheckpointError` on every rank and leaves model and optimizer
untouched.
"""

import math
import numbers
import os
import secrets
import shutil
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import msgpack
from mlx.utils import tree_flatten, tree_unflatten

from . import ckptdir
from .flatstate import SavedBuffer, build, copy_runs, describe_buffer, from_mlx_layout, shard_pieces, global_arrays
from .group import all_gather_object, init
from .layout import dtype_name
from .manifest import (
    FORMAT, MANIFEST, MODEL_FILE, VERSION, CheckpointError, describe_file, read_manifest, shard_file,
    verify_file, write_manifest,
)  # fmt: skip
from .sharded import ShardedOptimizer

PLAIN = (int, float, bool, str, type(None))


# ----------------------------------------------------------------------------- save


def save_checkpoint(directory, model, optimizer, *, step=None, metadata=None, keep_last=None):
    """Save ``model`` and ``optimizer`` as a new checkpoint under ``directory`` (collective).

    Args:
        directory (str or Path): the checkpoint root; the checkpoint is written to
          ``directory/step-NNNNNNNN`` and ``directory/latest`` then names it.
        model (mlx.nn.Module): the model (equal on every rank).
        optimizer: a :class:`~distopt.ShardedOptimizer` (any world size) or a plain
          ``mlx.optimizers`` optimizer.
        step (int, optional): the training step recorded and used in the name;
          default: the optimizer's step count.
        metadata (dict, optional): msgpack-serializable data returned by
          :func:`load_checkpoint` (epoch, data position, ...).
        keep_last (int, optional): keep only this many checkpoints (highest steps,
          always including the new one); default: keep all.

    Returns:
        Path: the new checkpoint directory.
    """
    group = _group_of(optimizer)
    rank = group.rank()
    mx.eval(model.parameters(), optimizer.state)  # on every rank first: the state may hold lazy collectives
    plan, error = None, ""
    try:
        plan = _plan_save(directory, model, optimizer, step, metadata, keep_last, group)
    except Exception as e:
        error = _message(e)
    if rank == 0 and plan is not None and not error:
        error = _start_tmp(plan)
    payload = plan and {"name": plan.get("name"), "tmp": plan.get("tmp")}
    agreed = _agree(group, error, payload, cleanup=lambda: rank == 0 and plan and _discard(plan.get("tmp")))
    plan.update(agreed[0])
    files, error = {}, ""
    try:
        files = _write_rank_files(plan, model, rank)
        _crash_point("shard", rank)
    except Exception as e:
        error = _message(e)
    gathered = _agree(group, error, files, cleanup=lambda: rank == 0 and _discard(plan["tmp"]))
    error = ""
    if rank == 0:
        try:
            _publish(plan, {k: v for f in gathered for k, v in f.items()})
        except Exception as e:
            error = _message(e)
            _discard(plan["tmp"])
    _agree(group, error)
    return Path(plan["root"]) / plan["name"]


def _plan_save(directory, model, optimizer, step, metadata, keep_last, group):
    """Everything this rank will write, checked before any file is touched."""
    if not isinstance(directory, (str, os.PathLike)):
        raise CheckpointError(f"directory must be a path, got {type(directory).__name__}.")
    root = Path(directory)
    if (root / MANIFEST).exists():
        raise CheckpointError(f"{root} is a checkpoint itself; save into a checkpoint root (for example its parent).")
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} exists and is not a directory.")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise CheckpointError(f"keep_last must be a positive integer or None, got {keep_last!r}.")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise CheckpointError(f"metadata must be a dict, got {type(metadata).__name__}.")
    try:
        msgpack.unpackb(msgpack.packb(metadata, use_bin_type=True), strict_map_key=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"metadata must be msgpack-serializable (str keys, numbers, strings, lists, dicts): {e}") from None
    state = optimizer.state
    params = dict(tree_flatten(model.parameters()))
    if _is_sharded(optimizer):
        globals_, shards = global_arrays(state), optimizer.flat_shards()
        buffers = {n: describe_buffer(optimizer.layout.buffers[n], _keys(s)) for n, s in shards.items()}
        num_shards, shard_index = group.size(), group.rank()
    else:
        globals_, shards, buffers = from_mlx_layout(state, params)
        num_shards, shard_index = 1, (0 if group.rank() == 0 else None)
    optimizer_step = int(globals_["step"].item()) if "step" in globals_ else 0
    step = _as_step(optimizer_step if step is None else step)
    lr = globals_.get("learning_rate")
    return {
        "root": str(root), "step": step, "keep_last": keep_last, "shard_index": shard_index,
        "globals": globals_, "shards": shards, "params": params,
        "manifest": {
            "format": FORMAT, "version": VERSION, "step": step, "optimizer_step": optimizer_step,
            "learning_rate": float(lr.item()) if lr is not None and lr.size == 1 else None,
            "world_size": group.size(), "num_shards": num_shards,
            "optimizer": describe_optimizer(optimizer),
            "model": {"file": MODEL_FILE, "arrays": _arrays(params)},
            "globals": {"arrays": _arrays(globals_)},
            "buffers": buffers,
            "shards": [shard_file(r, num_shards) for r in range(num_shards)],
            "metadata": metadata, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }  # fmt: skip


def _start_tmp(plan):
    """Rank 0: choose the checkpoint's name and create its temporary directory."""
    try:
        root = Path(plan["root"])
        root.mkdir(parents=True, exist_ok=True)
        plan["name"] = ckptdir.new_name(root, plan["step"])
        plan["tmp"] = str(root / f".tmp-{plan['name']}-{secrets.token_hex(4)}")
        os.mkdir(plan["tmp"])
        return ""
    except OSError as e:
        return f"Cannot create a checkpoint in {plan['root']}: {e}"


def _write_rank_files(plan, model, rank):
    """This rank's optimizer shard (and, on rank 0, the model weights); their checksums."""
    tmp, files = Path(plan["tmp"]), {}
    if not tmp.is_dir():
        raise CheckpointError(
            f"{tmp} is not visible on rank {rank}: the checkpoint directory must be on a "
            "filesystem that every rank sees (one machine, or a shared volume)."
        )
    if plan["shard_index"] is not None:
        arrays = {f"{n}/{k}": v for n, keys in plan["shards"].items() for k, v in keys.items()}
        if plan["shard_index"] == 0:
            arrays.update({f"global/{k}": v for k, v in plan["globals"].items()})
        name = shard_file(plan["shard_index"], plan["manifest"]["num_shards"])
        files[name] = _save(tmp / name, arrays)
    if rank == 0:
        files[MODEL_FILE] = _save(tmp / MODEL_FILE, plan["params"])
    return files


def _save(path, arrays):
    """Write ``arrays`` to ``path``, flush it to disk, and describe it (sha256, bytes)."""
    mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
    ckptdir.fsync_file(path)
    return describe_file(path)


def _publish(plan, files):
    """Rank 0: check every file arrived, write the manifest, rename, point ``latest``, prune."""
    tmp, root, manifest = Path(plan["tmp"]), Path(plan["root"]), plan["manifest"]
    for name in manifest["shards"] + [MODEL_FILE]:
        if name not in files:
            raise CheckpointError(f"No rank wrote {name}.")
        path = tmp / name
        if not path.is_file() or path.stat().st_size != files[name]["bytes"]:
            raise CheckpointError(
                f"{path} is not visible to rank 0 as written: the checkpoint directory must be on "
                "a filesystem that every rank sees (one machine, or a shared volume)."
            )
    manifest["files"] = files
    write_manifest(tmp, manifest)
    ckptdir.fsync_dir(tmp)
    _crash_point("manifest", 0)
    ckptdir.publish(root, tmp, plan["name"])
    _crash_point("rename", 0)
    ckptdir.point_latest(root, plan["name"], secrets.token_hex(4))
    _crash_point("latest", 0)
    if plan["keep_last"]:
        ckptdir.prune(root, plan["keep_last"], plan["name"])
    ckptdir.remove_stale(root)


def _discard(tmp):
    if tmp and Path(tmp).is_dir():
        shutil.rmtree(tmp, ignore_errors=True)


def _crash_point(point, rank):
    """Test hook: ``DISTOPT_CKPT_CRASH=point[:rank]`` makes the process die here, as in a power cut."""
    spec = os.environ.get("DISTOPT_CKPT_CRASH", "")
    if spec and spec.split(":")[0] == point and (":" not in spec or int(spec.split(":")[1]) == rank):
        os._exit(17)


# ----------------------------------------------------------------------------- load


def load_checkpoint(directory, model, optimizer):
    """Load a checkpoint into ``model`` and ``optimizer`` at this world size (collective).

    Args:
        directory (str or Path): a checkpoint root (its ``latest`` is loaded) or one
          checkpoint directory (``root/step-NNNNNNNN``).
        model (mlx.nn.Module): a model with the same parameter names, shapes and dtypes.
        optimizer: a :class:`~distopt.ShardedOptimizer` (any world size) or a plain
          ``mlx.optimizers`` optimizer, of the saved class and hyperparameters.

    The step count, learning rate (and schedule position) come from the checkpoint;
    set ``optimizer.learning_rate`` after loading to train on with another constant rate.

    Returns:
        dict: the ``metadata`` given to :func:`save_checkpoint`.

    Raises:
        CheckpointError: on every rank, naming the problem, with model and optimizer
          unchanged.
    """
    group = _group_of(optimizer)
    if _is_sharded(optimizer) and optimizer.layout is None:
        optimizer.init(model.trainable_parameters())  # collective: fixes this rank's shard
    loaded, error = None, ""
    try:
        loaded = _read(directory, model, optimizer, group.rank())
    except Exception as e:
        error = _message(e)
    _agree(group, error)
    weights, state, manifest = loaded
    model.load_weights(weights, strict=True)
    _assign_state(optimizer, state)
    return manifest["metadata"]


def _read(directory, model, optimizer, rank):
    """(weights, new state, manifest), checked against ``model`` and ``optimizer``; changes nothing."""
    path = ckptdir.resolve(directory)
    manifest = read_manifest(path)
    _check_optimizer(manifest, optimizer)
    params = dict(tree_flatten(model.parameters()))
    _check_model(manifest, params)
    _check_buffers(manifest, params)
    weights = load_verified_file(path, manifest, MODEL_FILE, manifest["model"]["arrays"])
    if _is_sharded(optimizer):
        state = _sharded_state(path, manifest, optimizer, rank)
    else:
        state = _mlx_state(path, manifest, optimizer)
    mx.eval(weights, state)
    return list(weights.items()), state, manifest


def _sharded_state(path, manifest, optimizer, rank):
    """``{"globals": ..., "shards": ...}`` of this rank's new shard, from the saved shards."""
    layout, current = optimizer.layout, optimizer.state.get("shards", {})
    names = set(manifest["buffers"]) | set(current) if manifest["buffers"] else set()
    buffers = {}
    for name in sorted(names):
        desc = manifest["buffers"].get(name)
        if desc is None:
            raise CheckpointError(f"The checkpoint has no optimizer state for {name} parameters, which this optimizer has.")
        if name not in layout.buffers:
            raise CheckpointError(f"The checkpoint has optimizer state for {name} parameters, which this optimizer lacks.")
        _check_entries(desc, [(e.path, e.shape) for e in layout.buffers[name].entries], name)
        mine = {k: dtype_name(parts[0].dtype) for k, parts in current.get(name, {}).items()}
        if mine != desc["keys"]:
            raise CheckpointError(f"The checkpoint's {name} optimizer state has keys {desc['keys']}; this optimizer has {mine}.")
        buffers[name] = (desc, shard_pieces(layout.buffers[name], layout.buffers[name].shard_ranges(rank)))
    return _rebuild(path, manifest, buffers)


def _mlx_state(path, manifest, optimizer):
    """The ``mlx.optimizers`` state tree (per-parameter dicts) from the saved shards."""
    inner = optimizer.inner if isinstance(optimizer, ShardedOptimizer) else optimizer
    for name, desc in manifest["buffers"].items():
        probe = {}
        inner.init_single(mx.zeros((1,), getattr(mx, name)), probe)
        if sorted(probe) != sorted(desc["keys"]):
            raise CheckpointError(
                f"The checkpoint's {name} optimizer state has keys {sorted(desc['keys'])}; this optimizer keeps "
                f"{sorted(probe)}. (A checkpoint with fp32 master weights needs master_weights=True; "
                "`distopt ckpt consolidate` converts any checkpoint for plain MLX.)"
            )
    return {"mlx_layout": tree_unflatten(mlx_state_items(path, manifest))}


def mlx_state_items(path, manifest):
    """``[(key, array)]`` of the full state in ``mlx.optimizers`` layout, flattened
    (``"step"``, ``"learning_rate"``, ``"layers.0.weight.m"``, ...), from every saved shard."""
    buffers = {n: (d, [(p, 0, math.prod(s)) for p, s, _ in d["entries"]]) for n, d in manifest["buffers"].items()}
    rebuilt = _rebuild(path, manifest, buffers)
    items = list(rebuilt["globals"].items())
    for name, keys in rebuilt["shards"].items():
        for p, shape, offset in manifest["buffers"][name]["entries"]:
            for key, flat in keys.items():
                items.append((f"{p}.{key}", flat[offset : offset + math.prod(shape)].reshape(shape)))
    return items


def _rebuild(path, manifest, buffers):
    """Globals and ``{dtype: {key: flat}}`` built from the pieces in ``buffers`` ({dtype: (desc, pieces)})."""
    plans = {n: copy_runs(SavedBuffer(d), pieces) for n, (d, pieces) in buffers.items()}
    needed = {0} | {r for runs in plans.values() for r, _, _ in runs if r is not None}
    sources = {r: _load_shard(path, manifest, r) for r in sorted(needed)}
    shards = {}
    for name, runs in plans.items():
        desc = buffers[name][0]
        shards[name] = {
            key: build(runs, {r: s[f"{name}/{key}"] for r, s in sources.items()}, getattr(mx, dtype))
            for key, dtype in desc["keys"].items()
        }
    globals_ = {k[len("global/") :]: v for k, v in sources[0].items() if k.startswith("global/")}
    return {"globals": globals_, "shards": shards}


def _load_shard(path, manifest, r):
    """Saved shard ``r``'s arrays, checked against the sizes the manifest implies."""
    expected = []
    for name, desc in manifest["buffers"].items():
        size = SavedBuffer(desc).shard_sizes[r]
        expected += [[f"{name}/{k}", [size], dtype] for k, dtype in desc["keys"].items()]
    if r == 0:
        expected += [[f"global/{p}", s, d] for p, s, d in manifest["globals"]["arrays"]]
    return load_verified_file(path, manifest, manifest["shards"][r], expected)


def load_verified_file(path, manifest, name, expected):
    """The arrays of a verified safetensors file, which must be exactly ``expected`` ([name, shape, dtype])."""
    file = verify_file(path, manifest, name)
    arrays = mx.load(str(file))
    got = {k: [list(v.shape), dtype_name(v.dtype)] for k, v in arrays.items()}
    want = {k: [list(s), d] for k, s, d in expected}
    for key in list(want) + list(got):
        if got.get(key) != want.get(key):
            raise CheckpointError(f"{file}: array '{key}' is {got.get(key)} but the manifest says {want.get(key)}.")
    return arrays


def _assign_state(optimizer, state):
    """Put the loaded state into the optimizer in place (its dict may be a compiled step's input)."""
    current = optimizer.state
    if "mlx_layout" in state:
        current.update(state["mlx_layout"])
        return
    current.update(tree_unflatten(list(state["globals"].items())))
    optimizer.load_flat_shards(state["shards"])


# ----------------------------------------------------------------------------- checks


def describe_optimizer(optimizer):
    """Class, hyperparameters and scheduled keys of the (inner) ``mlx.optimizers`` optimizer."""
    inner = optimizer.inner if isinstance(optimizer, ShardedOptimizer) else optimizer
    hyper = {}
    for k, v in sorted(vars(inner).items()):
        if k.startswith("_"):
            continue
        if isinstance(v, (list, tuple)) and all(isinstance(x, PLAIN) for x in v):
            hyper[k] = list(v)
        elif isinstance(v, PLAIN):
            hyper[k] = v
    return {"class": type(inner).__name__, "hyperparameters": hyper, "schedules": sorted(inner._schedulers)}


def _check_optimizer(manifest, optimizer):
    saved, mine = manifest["optimizer"], describe_optimizer(optimizer)
    if saved["class"] != mine["class"]:
        raise CheckpointError(f"The checkpoint holds {saved['class']} state; this optimizer is {mine['class']}.")
    for key in sorted(set(saved["hyperparameters"]) | set(mine["hyperparameters"])):
        a, b = saved["hyperparameters"].get(key), mine["hyperparameters"].get(key)
        if a != b:
            raise CheckpointError(f"The checkpoint's {saved['class']} has {key}={a!r}; this optimizer has {key}={b!r}.")
    if saved["schedules"] != mine["schedules"]:
        raise CheckpointError(f"The checkpoint schedules {saved['schedules']}; this optimizer schedules {mine['schedules']}.")


def _check_model(manifest, params):
    saved = {p: (list(s), d) for p, s, d in manifest["model"]["arrays"]}
    mine = {p: (list(v.shape), dtype_name(v.dtype)) for p, v in params.items()}
    for p in list(saved) + list(mine):
        if p not in mine:
            raise CheckpointError(f"The checkpoint has parameter '{p}', which the model lacks.")
        if p not in saved:
            raise CheckpointError(f"The model has parameter '{p}', which the checkpoint lacks.")
        if saved[p] != mine[p]:
            raise CheckpointError(f"Parameter '{p}' is {mine[p][0]} {mine[p][1]} in the model but {saved[p][0]} {saved[p][1]} in the checkpoint.")


def _check_entries(desc, mine, name):
    saved = {p: list(s) for p, s, _ in desc["entries"]}
    ours = {p: list(s) for p, s in mine}
    for p in list(saved) + list(ours):
        if saved.get(p) != ours.get(p):
            raise CheckpointError(
                f"The checkpoint's optimizer state for {name} parameters differs from this optimizer's at "
                f"'{p}': {saved.get(p)} in the checkpoint, {ours.get(p)} here."
            )


def _check_buffers(manifest, params):
    """Every parameter with saved optimizer state must be a model parameter of that shape and dtype."""
    for name, desc in manifest["buffers"].items():
        for p, shape, _ in desc["entries"]:
            v = params.get(p)
            if v is None or list(v.shape) != list(shape) or dtype_name(v.dtype) != name:
                raise CheckpointError(f"The checkpoint has {name} optimizer state of shape {shape} for '{p}', which the model does not match.")


# ----------------------------------------------------------------------------- helpers


def _as_step(step):
    """A non-negative Python int from an int, a NumPy integer or a scalar integer array."""
    if isinstance(step, mx.array) and step.size == 1 and mx.issubdtype(step.dtype, mx.integer):
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise CheckpointError(f"step must be a non-negative integer, got {step!r}.")
    return int(step)


def _group_of(optimizer):
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer.group
    if not isinstance(optimizer, optim.Optimizer):
        raise TypeError(f"optimizer must be a distopt or mlx.optimizers optimizer, got {type(optimizer).__name__}.")
    return init()


def _is_sharded(optimizer):
    return isinstance(optimizer, ShardedOptimizer) and optimizer.sharded


def _keys(state):
    return {k: dtype_name(v.dtype) for k, v in state.items()}


def _arrays(flat):
    return [[k, list(v.shape), dtype_name(v.dtype)] for k, v in flat.items()]


def _message(e):
    return str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"


def _agree(group, error, payload=None, cleanup=None):
    """Every rank's ``payload``; if any rank reports an error, the same CheckpointError on all."""
    everyone = all_gather_object({"error": error, "payload": payload}, group)
    failed = [(r, e["error"]) for r, e in enumerate(everyone) if e["error"]]
    if failed:
        if cleanup:
            cleanup()
        rank, message = failed[0]
        where = f" (rank {rank})" if group.size() > 1 else ""
        raise CheckpointError(f"{message}{where}")
    return [e["payload"] for e in everyone]
