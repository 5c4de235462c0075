"""The producer side of the spool: one locked segment per process, one append per message."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import threading
import weakref
from pathlib import Path

from ..core.atomic import fsync_dir
from . import SEGMENT_MODE, ensure
from .frame import frame

SEGMENT_BYTES = 8 * 1024 * 1024
NAME_ATTEMPTS = 16


class SpoolWriter:
    """Appends framed messages to this process's active segment.

    A segment is created and locked in `tmp/`, then renamed into `segments/`, so a
    reader never sees one that is not held; the lock is released when the process
    rolls to a new segment or dies, which tells the reader the segment is sealed.

    With fsync on, threads share fsyncs (group commit): each waits until one
    fdatasync that began after its own write has finished, whoever issued it.

    Across `fork()` (see `_before_fork`), the child starts as a producer of its own: it
    never appends to the parent's segment and never keeps it locked.
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
        with _registry_lock:  # not while a fork is under way: the child would not know this writer
            _live.add(self)

    @staticmethod
    def _new_producer_id() -> str:
        return f"{os.getpid()}-{secrets.token_hex(4)}"

    def _restart_in_child(self) -> None:
        """In a fork's child (no thread was inside this writer at the fork): drop the parent's segment."""
        if self._fd >= 0:
            # Only the child's copy: a flock belongs to the open file description, which the
            # parent still holds, so the parent's segment stays locked (unsealed) as it should.
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._size, self._seq = -1, 0, 0
        self._written = self._synced = 0
        self._producer = self._new_producer_id()
        self._lock, self._sync_lock = threading.Lock(), threading.Lock()

    def append(self, payload: bytes) -> None:
        """Append one message; returns once it is in the spool (on disk too when fsync is on)."""
        record = frame(payload)
        with self._lock:
            if self._fd < 0 or self._size >= SEGMENT_BYTES:
                self._roll()
            # A write that raises (ENOSPC, EDQUOT, EFBIG...) wrote nothing: the segment is still
            # clean and is used again next time, rather than sealed and replaced by an empty one.
            written = os.write(self._fd, record)
            if written != len(record):
                self._seal()  # a torn tail stays at the end of a sealed segment, where readers expect it
                raise OSError(f"short write to the spool ({written} of {len(record)} bytes)")
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
            self._dirs = ensure(self.spool_dir, durable=self.fsync)
        self._seq += 1
        for _ in range(NAME_ATTEMPTS):
            try:
                self._fd, self._size = self._publish(f"{self._producer}.{self._seq:08d}.seg"), 0
                return
            except (FileExistsError, PermissionError):
                # Someone in the group took the name first (the names are visible and guessable):
                # jump ahead by a random stride; later numbers keep this producer's order.
                self._seq += secrets.randbelow(1 << 20) + 1
        raise FileExistsError(f"no free segment name for producer {self._producer} in {self._dirs['tmp']}")

    def _publish(self, name: str) -> int:
        """Create segment `name` locked in tmp/, then rename it into segments/; return its descriptor."""
        assert self._dirs is not None  # noqa: S101 - opened in __init__; for the type checker
        tmp, published = self._dirs["tmp"] / name, self._dirs["segments"] / name
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, SEGMENT_MODE)
        made = tmp  # where the half-made segment is, to be removed if publishing it fails
        try:
            os.fchmod(fd, SEGMENT_MODE)  # open() applied the umask; the daemon reads segments as the group
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.lexists(published):
                raise FileExistsError(errno.EEXIST, f"{published} exists")  # never replace another's file
            os.rename(tmp, published)
            made = published
            if self.fsync:
                fsync_dir(self._dirs["segments"])
        except BaseException:
            try:
                with contextlib.suppress(OSError):
                    os.unlink(made)  # still locked, and empty: a reader never takes it for a sealed segment
            finally:
                os.close(fd)
            raise
        return fd


# Fork safety. Another thread may be inside `_roll` or `_seal` when a thread forks; the child
# would then inherit half-changed state, a held lock, or a locked segment it never closes
# (which stalls the parent's next segments until the child exits). So the forking thread
# takes every writer's locks first, in their usual order, and the child starts afresh.
_registry_lock = threading.Lock()  # guards _live; held from before a fork to after it
_live: weakref.WeakSet[SpoolWriter] = weakref.WeakSet()  # every writer of this process
_held: list[SpoolWriter] = []  # writers whose locks the forking thread holds right now
_registry_held = False


def _before_fork() -> None:
    global _registry_held
    _registry_lock.acquire()
    _registry_held = True
    # A thread holds at most one writer's locks at a time, so taking them writer by writer cannot deadlock.
    for writer in list(_live):
        writer._lock.acquire()
        try:
            writer._sync_lock.acquire()
        except BaseException:
            writer._lock.release()
            raise
        _held.append(writer)


def _after_fork_in_parent() -> None:
    global _registry_held
    for writer in _held:
        writer._sync_lock.release()
        writer._lock.release()
    _held.clear()
    if _registry_held:
        _registry_held = False
        _registry_lock.release()


def _after_fork_in_child() -> None:
    global _registry_held
    for writer in list(_live):  # every one, even one a failed `_before_fork` did not get to
        writer._restart_in_child()  # fresh locks: the parent's stay held in this copy of memory
    _held.clear()
    if _registry_held:
        _registry_held = False
        _registry_lock.release()  # the forking thread took it, and is this process's only thread


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
