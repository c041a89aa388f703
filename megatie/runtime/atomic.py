"""Writes that a crash never leaves half done: a file or a directory is written next to its place and
renamed into it, and the rename made durable. Every JSON megatie writes is strict (no NaN)."""

from __future__ import annotations

import json
import math
import os
import shutil


def finite_or_none(value):
    """``value`` with every non-finite float (NaN, inf) replaced by None, recursively: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
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


def write_json_atomic(path: str, obj) -> None:
    """Write JSON next to ``path`` and rename it into place, so a reader never sees half a file."""
    write_lines_atomic(path, [json.dumps(finite_or_none(obj), indent=2, allow_nan=False)])


def write_lines_atomic(path: str, lines: list[str]) -> None:
    """Write ``lines`` (each ends with a newline or gets one) next to ``path`` and rename into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(tmp: str, final: str) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing an older one of that name; a
    crash leaves either the old or the new directory under ``final``, never half of one."""
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))
