"""A checkpoint root: step-numbered checkpoints, a ``latest`` pointer, atomic publication.

::

    ckpts/                      the directory given to save_checkpoint
      latest                    one line: the name of the newest complete checkpoint
      step-00000100/            a complete checkpoint (manifest.msgpack + safetensors)
      step-00000200/
      .tmp-step-00000300-9f2c/  being written; invisible to loading until renamed

A checkpoint is written under a ``.tmp-`` name, then renamed (atomic on POSIX) to its
final name, and only then is ``latest`` replaced (``os.replace``, atomic too). So at
any moment ``latest`` names a complete checkpoint, and a crash leaves at most a
``.tmp-`` directory behind, which the next successful save removes.
"""

import os
import re
import shutil
from pathlib import Path

from .manifest import MANIFEST, CheckpointError

LATEST = "latest"
_NAME = re.compile(r"^step-(\d{8,})(?:\.(\d+))?$")


def fsync_dir(path):
    """Flush a directory's entries (a rename inside it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path):
    """Flush the file at ``path`` to disk (``fsync``), so a later rename publishes its data."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def new_name(root, step):
    """``step-00000100``, or ``step-00000100.1``, ``.2``, ... if that step was saved before."""
    name, rev = f"step-{step:08d}", 0
    while (Path(root) / name).exists():
        rev += 1
        name = f"step-{step:08d}.{rev}"
    return name


def resolve(directory):
    """The checkpoint directory for ``directory``: itself if it holds a manifest, else its ``latest``."""
    path = Path(directory)
    if (path / MANIFEST).exists():
        return path
    pointer = path / LATEST
    if not pointer.is_file():
        if not path.exists():
            raise CheckpointError(f"No checkpoint at {path}: the directory does not exist.")
        raise CheckpointError(f"No checkpoint at {path}: it has neither {MANIFEST} nor a '{LATEST}' pointer.")
    if pointer.stat().st_size > 4096:
        raise CheckpointError(f"{pointer} is not a checkpoint pointer (too large).")
    name = pointer.read_text(errors="replace").strip()
    if not _NAME.match(name):
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory name (step-NNNNNNNN).")
    target = path / name
    if not (target / MANIFEST).exists():
        raise CheckpointError(f"{pointer} names {name}, but {target} holds no {MANIFEST}.")
    return target


def publish(root, tmp, name):
    """Rename the finished ``tmp`` to ``root/name`` and point ``latest`` at it."""
    os.rename(tmp, Path(root) / name)
    fsync_dir(root)


def point_latest(root, name, token):
    """Atomically replace ``root/latest`` with ``name``."""
    tmp = Path(root) / f".latest.tmp-{token}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(root) / LATEST)
    fsync_dir(root)


def checkpoints(root):
    """Names of the complete checkpoints in ``root``, oldest step first."""
    found = []
    for p in Path(root).iterdir():
        m = _NAME.match(p.name)
        if m and (p / MANIFEST).exists():
            found.append((int(m.group(1)), int(m.group(2) or 0), p.name))
    return [name for _, _, name in sorted(found)]


def prune(root, keep_last, current):
    """Delete all but the ``keep_last`` highest-step checkpoints; ``current`` is always kept."""
    names = [n for n in checkpoints(root) if n != current]
    doomed = names[: max(0, len(names) - (keep_last - 1))]
    for name in doomed:
        trash = Path(root) / f".tmp-trash-{name}"
        os.rename(Path(root) / name, trash)  # never leave a half-deleted checkpoint under its name
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def remove_stale(root, keep=()):
    """Remove ``.tmp-`` leftovers of interrupted saves."""
    for p in Path(root).iterdir():
        if (p.name.startswith(".tmp-") or p.name.startswith(".latest.tmp-")) and p.name not in keep:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
