"""The producer side of the spool: one locked segment per process, one append per message."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import threading
from pathlib import Path

from .._atomic import fsync_dir
from . import SEGMENT_MODE, ensure
from ._frame import frame

SEGMENT_BYTES = 8 * 1024 * 1024


class SpoolWriter:
    """Appends framed messages to this process's active segment.

    A segment is created and locked in `tmp/`, then renamed into `segments/`, so a
    reader never sees one that is not held; the lock is released when the process
    rolls to a new segment or dies, which tells the reader the segment is sealed.

    With fsync on, threads share fsyncs (group commit): each waits until one
    fdatasync that began after its own write has finished, whoever issued it.
    """

    def __init__(self, spool_dir: Path, *, fsync: bool = False) -> None:
        self.spool_dir = spool_dir
        self.fsync = fsync
        self._lock = threading.Lock()  # guards the segment and writes to it
        self._sync_lock = threading.Lock()  # one fdatasync at a time; taken after _lock, never before
        self._fd = -1
        self._size = 0
        self._seq = 0
        self._written = 0  # appends done, in order
        self._synced = 0  # appends known to be on disk
        self._producer = self._new_producer_id()
        self._dirs: dict[str, Path] | None = None
        os.register_at_fork(after_in_child=self._after_fork)

    @staticmethod
    def _new_producer_id() -> str:
        return f"{os.getpid()}-{secrets.token_hex(4)}"

    def _after_fork(self) -> None:
        # The child shares the parent's open segment; it must never append to it.
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._size, self._seq = -1, 0, 0
        self._producer = self._new_producer_id()
        self._lock, self._sync_lock = threading.Lock(), threading.Lock()

    def append(self, payload: bytes) -> None:
        """Append one message; returns once it is in the spool (on disk too when fsync is on)."""
        record = frame(payload)
        with self._lock:
            if self._fd < 0 or self._size >= SEGMENT_BYTES:
                self._roll()
            try:
                written = os.write(self._fd, record)
                if written != len(record):
                    raise OSError(f"short write to the spool ({written} of {len(record)} bytes)")
            except OSError:
                self._seal()  # a torn tail stays at the end of a sealed segment, where readers expect it
                raise
            self._size += written
            self._written += 1
            mine = self._written
        if self.fsync:
            self._sync(mine)

    def _sync(self, mine: int) -> None:
        with self._sync_lock:
            if self._synced >= mine:
                return  # another thread's fdatasync began after our write and covered it
            upto = self._written  # every append counted here is complete, so this sync covers it
            os.fdatasync(self._fd)
            self._synced = upto

    def close(self) -> None:
        with self._lock:
            self._seal()

    def _seal(self) -> None:
        if self._fd < 0:
            return
        with self._sync_lock:  # no fdatasync may run on a closed (and perhaps reused) descriptor
            try:
                if self.fsync:
                    os.fdatasync(self._fd)
                    self._synced = self._written
            finally:
                os.close(self._fd)
                self._fd = -1

    def _roll(self) -> None:
        self._seal()
        if self._dirs is None:
            self._dirs = ensure(self.spool_dir)
        self._seq += 1
        name = f"{self._producer}.{self._seq:08d}.seg"
        tmp = self._dirs["tmp"] / name
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, SEGMENT_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(tmp, self._dirs["segments"] / name)
            if self.fsync:
                fsync_dir(self._dirs["segments"])
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fd, self._size = fd, 0
