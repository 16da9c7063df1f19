"""Writing a file so that no reader ever sees half of it (issue 17: a cache that is never stale).

`atomic_write` writes into a temporary file with a unique name in the target's folder, then
moves it over the target with `os.replace` (atomic on one file system): a reader sees the old
file or the whole new one, two writers of one file never share a temporary name, and an
interrupted write leaves the old file as it was and no temporary file behind. The statistics
cache (`stats`) writes through it, and so do the scripts' JSON results (`write_json`).
This module imports nothing of the package.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(f)` on a binary file that replaces `path` only once `write` has returned.

    The folder is created if needed. On any error (or KeyboardInterrupt) the temporary file is
    removed, `path` is left as it was, and the error propagates. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1, **dumps: Any) -> Path:
    """`data` as JSON (UTF-8, a final newline; values JSON cannot hold written with `str`),
    atomically (`atomic_write`). Extra keyword arguments go to `json.dumps`. Returns the path.
    The JSON is built before the file is touched, so data JSON cannot encode leaves no trace."""
    text = json.dumps(data, indent=indent, **{"default": str, **dumps}) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
