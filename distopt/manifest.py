"""The checkpoint manifest: one msgpack map that describes every file of a checkpoint.

A checkpoint directory holds ``manifest.msgpack``, ``model.safetensors`` (the plain
model weights) and one ``optimizer-RRRRR-of-NNNNN.safetensors`` per saving rank. The
manifest records, for every dtype buffer of the flat layout, where each parameter
lives (``entries``: path, shape, offset), the padded size and the buckets with their
per-rank counts, so any world size can find a flat position in the saved shards:

.. math::

    \\text{flat}[p] = \\text{shard}_r[\\,q\\,] \\quad\\text{for the bucket } b \\ni p,\\;
    \\text{the rank } r \\text{ whose part of } b \\text{ holds } p,\\;
    q = \\sum_{b' < b} c_{b',r} + (p - \\text{lo}_{b,r})

It also records the optimizer class and hyperparameters, the step, the schedule
position, the user's metadata and a sha256 of every file.

Reading is defensive: the manifest is untrusted input. It is parsed with msgpack
(never pickle) under size limits, every field is type-checked, file names must be plain
names inside the directory, sizes must be consistent with each other and with the
files on disk, and every file's sha256 is checked before MLX parses it.
"""

import hashlib
import os
import re
from pathlib import Path

import msgpack

FORMAT = "distopt-checkpoint"
VERSION = 1
MANIFEST = "manifest.msgpack"
MODEL_FILE = "model.safetensors"
MAX_MANIFEST_BYTES = 64 * 1024**2
MAX_ELEMENTS = 2**48  # no real buffer comes near this; larger counts are rejected as absurd
MAX_RANKS = 4096
DTYPES = ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
          "float16", "bfloat16", "float32", "float64", "complex64")  # fmt: skip
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded; raised on every rank with one message."""


def shard_file(rank, num_shards):
    """File name of ``rank``'s optimizer shard."""
    return f"optimizer-{rank:05d}-of-{num_shards:05d}.safetensors"


def sha256_of(path, chunk=4 * 1024**2):
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_file(path):
    """``{"sha256", "bytes"}`` of a file, as the manifest records it."""
    return {"sha256": sha256_of(path), "bytes": os.path.getsize(path)}


def pack(manifest):
    """The manifest dict as msgpack bytes."""
    return msgpack.packb(manifest, use_bin_type=True)


def write_manifest(directory, manifest):
    """Write ``directory/manifest.msgpack`` and flush it to disk."""
    path = Path(directory) / MANIFEST
    with open(path, "wb") as f:
        f.write(pack(manifest))
        f.flush()
        os.fsync(f.fileno())


def read_manifest(directory):
    """The validated manifest of the checkpoint in ``directory`` (files not yet verified).

    Raises:
        CheckpointError: naming the problem when the manifest is missing, not msgpack,
          too large, or inconsistent.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {MANIFEST} is missing.")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{path} is {size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have.")
    data = path.read_bytes()
    try:
        manifest = _unpack(data)
    except Exception as e:  # msgpack raises several exception types for bad bytes
        raise CheckpointError(f"{path} is not a valid msgpack manifest ({type(e).__name__}: {e}).") from None
    try:
        validate(manifest)
    except KeyError as e:
        raise CheckpointError(f"{path} is not a valid distopt manifest: the field {e} is missing.") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid distopt manifest: {e}") from None
    return manifest


def _unpack(data):
    """One msgpack object, strictly: string keys, no extension types, no trailing bytes."""
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, max_buffer_size=MAX_MANIFEST_BYTES, ext_hook=_refuse_ext, timestamp=0
    )
    unpacker.feed(data)
    obj = unpacker.unpack()
    if unpacker.tell() != len(data):
        raise ValueError(f"{len(data) - unpacker.tell()} trailing bytes after the manifest")
    return obj


def _refuse_ext(code, data):
    raise ValueError(f"msgpack extension type {code} is not allowed in a manifest")


def validate(m):
    """Check types and the consistency of every field; raise ValueError naming the first problem."""
    _expect(m, dict, "the manifest")
    if m.get("format") != FORMAT:
        raise ValueError(f"'format' is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("version") != VERSION:
        raise ValueError(f"version {m.get('version')!r} is not supported (this distopt reads version {VERSION})")
    num_shards = _int(m, "num_shards", 0, MAX_RANKS)
    _int(m, "world_size", 1, MAX_RANKS)
    _int(m, "step", 0, 2**63)
    _int(m, "optimizer_step", 0, 2**63)
    _expect(m["optimizer"], dict, "'optimizer'")
    _expect(m["optimizer"]["class"], str, "'optimizer.class'")
    _expect(m["optimizer"]["hyperparameters"], dict, "'optimizer.hyperparameters'")
    _expect(m["optimizer"]["schedules"], list, "'optimizer.schedules'")
    _expect(m["metadata"], dict, "'metadata'")
    files = _expect(m["files"], dict, "'files'")
    for name, info in files.items():
        _safe_name(name)
        _expect(info, dict, f"files[{name!r}]")
        if not (isinstance(info.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", info["sha256"])):
            raise ValueError(f"files[{name!r}] has no valid sha256")
        _int(info, "bytes", 0, 2**62)
    _validate_arrays(m["model"], "'model'")
    _expect(m["model"]["file"], str, "'model.file'")
    _known_file(files, m["model"]["file"])
    _validate_arrays(m["globals"], "'globals'")
    shards = _expect(m["shards"], list, "'shards'")
    if len(shards) != num_shards:
        raise ValueError(f"'shards' lists {len(shards)} files for {num_shards} shards")
    for name in shards:
        _known_file(files, name)
    if len(set(shards)) != len(shards) or m["model"]["file"] in shards:
        raise ValueError("'shards' names a file twice")
    for name, buf in _expect(m["buffers"], dict, "'buffers'").items():
        _dtype(name)
        _validate_buffer(name, buf, num_shards)


def _validate_arrays(section, what):
    _expect(section, dict, what)
    for item in _expect(section["arrays"], list, f"{what}.arrays"):
        _expect(item, list, f"an item of {what}.arrays")
        path, shape, dtype = item
        _expect(path, str, f"a path in {what}")
        _shape(shape, f"'{path}'")
        _dtype(dtype)


def _validate_buffer(name, buf, num_shards):
    _expect(buf, dict, f"buffer {name}")
    size = _int(buf, "size", 0, MAX_ELEMENTS)
    padded = _int(buf, "padded_size", size, MAX_ELEMENTS)
    for key, dtype in _expect(buf["keys"], dict, f"buffer {name} keys").items():
        _dtype(dtype)
    pos = 0
    for item in _expect(buf["entries"], list, f"buffer {name} entries"):
        path, shape, offset = item
        _expect(path, str, f"a path in buffer {name}")
        n = _shape(shape, f"'{path}'")
        if offset != pos:
            raise ValueError(f"buffer {name}: '{path}' starts at {offset}, expected {pos} (entries must be contiguous)")
        pos += n
    if pos != size:
        raise ValueError(f"buffer {name}: entries hold {pos} elements but size is {size}")
    pos = 0
    for item in _expect(buf["buckets"], list, f"buffer {name} buckets"):
        start, stop, counts = item
        if start != pos or not isinstance(stop, int) or stop <= start or stop > padded:
            raise ValueError(f"buffer {name}: bucket [{start}, {stop}) does not continue at {pos} inside {padded}")
        _expect(counts, list, f"buffer {name} bucket counts")
        if len(counts) != num_shards or any(not isinstance(c, int) or c < 0 for c in counts) or sum(counts) != stop - start:
            raise ValueError(f"buffer {name}: bucket [{start}, {stop}) counts {counts} do not split it into {num_shards} parts")
        pos = stop
    if pos != padded:
        raise ValueError(f"buffer {name}: buckets cover {pos} of {padded} elements")


def _expect(value, kind, what):
    if not isinstance(value, kind):
        raise TypeError(f"{what} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _int(d, key, lo, hi):
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"'{key}' is {v!r}, expected an integer in [{lo}, {hi}]")
    return v


def _shape(shape, what):
    _expect(shape, list, f"the shape of {what}")
    n = 1
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_ELEMENTS:
            raise ValueError(f"the shape of {what} is {shape!r}: absurd dimension")
        n *= d
    if len(shape) > 32 or n > MAX_ELEMENTS:
        raise ValueError(f"the shape of {what} is {shape!r}: absurd size")
    return n


def _dtype(name):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}")


def _safe_name(name):
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise ValueError(f"file name {name!r} is not a plain file name inside the checkpoint directory")


def _known_file(files, name):
    _safe_name(name)
    if name not in files:
        raise ValueError(f"{name!r} has no checksum in 'files'")


def verify_file(directory, manifest, name):
    """Path of ``name`` after checking its size and sha256 against the manifest."""
    expected = manifest["files"][name]
    path = Path(directory) / name
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"{path} is missing (the checkpoint is incomplete).")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"{path} has {size} bytes, the manifest says {expected['bytes']}: the file is truncated or altered.")
    if sha256_of(path) != expected["sha256"]:
        raise CheckpointError(f"{path} does not match its sha256 in the manifest: the file is corrupted or altered.")
    return path
