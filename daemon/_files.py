"""The daemon's open log files: a bounded set of append handles inside the log tree."""

from __future__ import annotations

import os
from collections import OrderedDict

from apilog._tree import LogTree

MAX_OPEN = 256  # a flood of users must not exhaust file handles


class OpenFiles:
    """Append handles kept open across batches, least recently used closed first."""

    def __init__(self, tree: LogTree, *, durable: bool, limit: int = MAX_OPEN) -> None:
        self.tree = tree
        self.durable = durable
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
            self._close(*self._fds.popitem(last=False))
        return fd

    def size(self, relpath: str) -> int:
        return os.fstat(self.fd(relpath)).st_size

    def append(self, relpath: str, data: bytes) -> None:
        fd = self.fd(relpath)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def sync(self, relpaths: list[str]) -> None:
        for relpath in relpaths:
            fd = self._fds.get(relpath)
            if fd is not None:
                os.fdatasync(fd)

    def truncate(self, relpath: str, size: int) -> None:
        """Cut `relpath` back to `size` bytes (undoing an uncommitted batch); a missing file is left missing."""
        self.forget(relpath)
        try:
            fd = self.tree.open_existing(relpath, os.O_WRONLY)
        except FileNotFoundError:
            return
        try:
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)
                if self.durable:
                    os.fsync(fd)
        finally:
            os.close(fd)

    def forget(self, relpath: str) -> None:
        fd = self._fds.pop(relpath, None)
        if fd is not None:
            self._close(relpath, fd)

    def close(self) -> None:
        """Close every handle; the first failure (a disk gone read-only) is raised once all are closed."""
        failure: OSError | None = None
        while self._fds:
            try:
                self._close(*self._fds.popitem())
            except OSError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _close(self, relpath: str, fd: int) -> None:
        # A handle closed mid-batch must not take its unsynced appends with it.
        try:
            if self.durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)
