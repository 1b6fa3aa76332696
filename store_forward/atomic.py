"""Crash-safe replacement of small state files: write a temp file, fsync it, rename it over, fsync the dir.

Why each step: the temp file lives in the target's directory so the rename stays on one file system
(rename is atomic only there); fsync before rename so the new name never points at data still in the
page cache (after a power cut the file would be empty or torn); fsync of the directory after rename so
the rename itself (a directory entry change) is on disk before we report success. A reader therefore
sees either the whole old file or the whole new one, never a mix, even across power loss.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make renames, creations and deletions of entries in directory `path` durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o640) -> None:
    """Replace `path` with `data` atomically and durably (see the module docstring).

    Raises OSError (e.g. ENOSPC) with the old file untouched and no temp file left behind."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
