"""Atomic small-file replacement: write aside, fsync, rename into place."""

from __future__ import annotations

import os
from pathlib import Path

from . import fs
from .folder import Folder


def write_atomic(path: Path, data: bytes, *, mode: int = 0o640, durable: bool = True) -> None:
    """Replace `path` with `data` so that readers see either the old or the new file whole."""
    with Folder.at(path.parent) as folder:
        folder.write_atomic(path.name, data, mode=mode, durable=durable)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = fs.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fs.fsync(fd)
    finally:
        os.close(fd)
