"""The daemon's open log files: thousands of append handles inside the log tree, made durable all at once."""

from __future__ import annotations

import contextlib
import errno
import os
from collections import OrderedDict

from apilog.core import fs
from apilog.core.tree import LogTree

from ..state.folders import MAX_OPEN

# Errors that say the log disk as a whole cannot take a batch: undo it and retry, never divert entries.
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM})

class OpenFiles:
    """Append handles kept open across batches, least recently used closed first, each with its size.

    Only apilogd appends to a live file, so a size measured once when the file is opened and
    then counted up by each append saves an fstat per file per batch (thousands per batch with
    thousands of users). A file cut outside apilogd is measured again at a redo.
    """

    def __init__(self, tree: LogTree, *, limit: int = MAX_OPEN) -> None:
        self.tree = tree
        self.limit = limit
        self._open: OrderedDict[str, list[int]] = OrderedDict()  # relpath -> [fd, size]

    def _handle(self, relpath: str) -> list[int]:
        handle = self._open.get(relpath)
        if handle is not None:
            self._open.move_to_end(relpath)
            return handle
        return self._keep(relpath, self.tree.open_append(relpath))  # created 0640 (and its folders 0750) if missing

    def _keep(self, relpath: str, fd: int) -> list[int]:
        handle = self._open[relpath] = [fd, os.fstat(fd).st_size]
        while len(self._open) > self.limit:
            os.close(self._open.popitem(last=False)[1][0])
        return handle

    def size(self, relpath: str) -> int:
        """The size of `relpath` after every append so far; 0 for a missing file, which is not created here.

        A batch measures its files before its journal record is durable: a file created then, and a
        crash before the record, would leave an empty file no seal line names. `append` creates it.
        """
        handle = self._open.get(relpath)
        if handle is not None:
            self._open.move_to_end(relpath)
            return handle[1]
        try:
            fd = self.tree.open_existing(relpath, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            return 0
        return self._keep(relpath, fd)[1]

    def size_on_disk(self, relpath: str) -> int:
        """The size of `relpath`, 0 when it is missing or not a file apilogd could write (never created here)."""
        if relpath in self._open:
            return self._open[relpath][1]
        try:
            fd = self.tree.open_existing(relpath, os.O_RDONLY)
        except OSError:
            return 0
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def append(self, relpath: str, data: bytes) -> None:
        handle = self._handle(relpath)
        try:
            written = fs.write(handle[0], data)
            while written < len(data):  # a short write (a signal, a nearly full disk): the rest follows
                written += fs.write(handle[0], memoryview(data)[written:])
        except BaseException:
            self.forget(relpath)  # how much went in is unknown: measured again when next opened
            raise
        handle[1] += written

    def redo(self, relpath: str, before: int, data: bytes) -> int | None:
        """Make `relpath` end with `data` after its first `before` bytes, whatever a crash left of an earlier try.

        Returns the size found when the file was shorter than `before` (cut or removed outside
        apilogd since): the bytes then go at its end, never past a hole.
        """
        handle = self._handle(relpath)
        handle[1] = size = os.fstat(handle[0]).st_size  # measured, not counted: this follows a failure
        if size > before:
            fs.ftruncate(handle[0], before)
            handle[1] = before
        self.append(relpath, data)
        return size if size < before else None

    def sync(self) -> None:
        """Every append so far on disk: one syncfs of the log tree's file system."""
        fs.syncfs(self.tree.root_fd)

    def truncate(self, relpath: str, size: int) -> None:
        """Cut `relpath` back to `size` bytes (undoing what a ledger of the version before left); a missing file stays missing."""
        self.forget(relpath)
        try:
            fd = self.tree.open_existing(relpath, os.O_WRONLY)
        except FileNotFoundError:
            return
        try:
            if os.fstat(fd).st_size > size:
                fs.ftruncate(fd, size)
        finally:
            os.close(fd)

    def forget(self, relpath: str) -> None:
        handle = self._open.pop(relpath, None)
        if handle is not None:
            os.close(handle[0])

    def close(self) -> None:
        """Close every handle (what they wrote is made durable by `sync`, not by closing)."""
        while self._open:
            with contextlib.suppress(OSError):
                os.close(self._open.popitem()[1][0])
