"""The daemon's open log files: thousands of append handles inside the log tree, made durable all at once."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections import OrderedDict

from apilog._tree import LogTree

MAX_OPEN = 16384  # handles kept; past them the least recently used is closed (no sync: the journal has its bytes)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def syncfs(fd: int) -> None:
    """Flush every file of the file system holding `fd` to disk (one call, whatever the number of files)."""
    if _libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class OpenFiles:
    """Append handles kept open across batches, least recently used closed first."""

    def __init__(self, tree: LogTree, *, limit: int = MAX_OPEN) -> None:
        self.tree = tree
        self.limit = limit
        self._fds: OrderedDict[str, int] = OrderedDict()

    def fd(self, relpath: str) -> int:
        """An append handle for `relpath`, created 0640 (and its folders 0750) if missing."""
        fd = self._fds.get(relpath)
        if fd is not None:
            self._fds.move_to_end(relpath)
            return fd
        fd = self.tree.open_append(relpath)
        self._fds[relpath] = fd
        while len(self._fds) > self.limit:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def size(self, relpath: str) -> int:
        return os.fstat(self.fd(relpath)).st_size

    def append(self, relpath: str, data: bytes) -> None:
        fd = self.fd(relpath)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def redo(self, relpath: str, before: int, data: bytes) -> None:
        """Make `relpath` end with `data` after its first `before` bytes, whatever a crash left of an earlier try."""
        size = self.size(relpath)
        if size > before:
            os.ftruncate(self.fd(relpath), before)
        # Shorter than the journal says (cut or removed by hand since): the bytes go at its end, never past a hole.
        self.append(relpath, data)

    def sync(self) -> None:
        """Every append so far on disk: one syncfs of the log tree's file system."""
        syncfs(self.tree.root_fd)

    def truncate(self, relpath: str, size: int) -> None:
        """Cut `relpath` back to `size` bytes (undoing a batch a ledger of the previous version left); a missing file stays missing."""
        self.forget(relpath)
        try:
            fd = self.tree.open_existing(relpath, os.O_WRONLY)
        except FileNotFoundError:
            return
        try:
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def forget(self, relpath: str) -> None:
        fd = self._fds.pop(relpath, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close every handle (what they wrote is made durable by `sync`, not by closing)."""
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.popitem()[1])
