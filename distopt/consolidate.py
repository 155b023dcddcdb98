"""Turn a distopt checkpoint into plain MLX files, and summarize one.

``consolidate`` writes ``OUT/model.safetensors`` (the weights, for ``model.load_weights``)
and ``OUT/optimizer.safetensors``: the optimizer state in the layout of
``mlx.optimizers``, flattened (``"step"``, ``"learning_rate"``,
``"layers.0.weight.m"``, ...), so that::

    opt.state = tree_unflatten(list(mx.load("OUT/optimizer.safetensors").items()))

resumes with a plain MLX optimizer. fp32 master weights (bf16 training) go to
``OUT/master.safetensors``; distopt-only counters (loss scale, skipped steps) are left out.
"""

import os
import shutil
from pathlib import Path

import mlx.core as mx

from . import ckptdir
from .checkpoint import load_verified_file, mlx_state_items
from .manifest import MODEL_FILE, CheckpointError, read_manifest, verify_file

MLX_GLOBALS = ("step", "learning_rate")


def consolidate(directory, out):
    """Write plain MLX files for the checkpoint at ``directory`` into ``out``; return their paths.

    Every file is checked against its sha256 first. Existing files in ``out`` are never
    overwritten (a :class:`CheckpointError` is raised instead).
    """
    path = ckptdir.resolve(directory)
    manifest = read_manifest(path)
    out = Path(out)
    names = ["model.safetensors", "optimizer.safetensors", "master.safetensors"]
    for name in names:
        if (out / name).exists():
            raise CheckpointError(f"{out / name} exists; consolidate into a new or empty directory.")
    load_verified_file(path, manifest, MODEL_FILE, manifest["model"]["arrays"])  # checks the weights
    keep = set(MLX_GLOBALS) | set(manifest["optimizer"]["schedules"])
    globals_ = {p for p, _, _ in manifest["globals"]["arrays"]}
    state, master = {}, {}
    for key, value in mlx_state_items(path, manifest):
        if key in globals_:
            if key in keep:
                state[key] = value
        elif key.endswith(".master"):
            master[key[: -len(".master")]] = value
        else:
            state[key] = value
    out.mkdir(parents=True, exist_ok=True)
    written = [_copy(verify_file(path, manifest, MODEL_FILE), out / "model.safetensors")]
    written.append(_write(out / "optimizer.safetensors", state, manifest["optimizer"]["class"]))
    if master:
        written.append(_write(out / "master.safetensors", master, "fp32 master weights"))
    return written


def _write(path, arrays, what):
    tmp = path.with_name(f".tmp-{path.name}")  # save_safetensors keeps a .safetensors suffix
    mx.eval(arrays)
    mx.save_safetensors(str(tmp), arrays, metadata={"format": "mlx", "content": what})
    os.replace(tmp, path)
    return path


def _copy(src, dst):
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def summary(directory, verify=True):
    """The manifest of the checkpoint at ``directory``, with each file's check result under ``"check"``."""
    path = ckptdir.resolve(directory)
    manifest = read_manifest(path)
    manifest["path"] = str(path)
    manifest["check"] = {}
    for name in manifest["files"]:
        if not verify:
            manifest["check"][name] = "not checked"
            continue
        try:
            verify_file(path, manifest, name)
            manifest["check"][name] = "ok"
        except CheckpointError as e:
            manifest["check"][name] = f"BAD: {e}"
    return manifest
