"""The producers' shared limits: each user's token bucket, the spool's byte budget, and counts of what was dropped.

Every process that calls `delay()` on one host shares one small table file,
`spool/limits/table`, read and written with `pread`/`pwrite` under `flock` (never mapped:
a member of the group who cut the file would otherwise crash every app with SIGBUS). It holds:

- the bytes producers appended to the spool and the bytes apilogd drained from it (their
  difference is what waits, checked against APILOG_SPOOL_MAX before each append);
- a GCRA token bucket per location (APILOG_USER_RATE, APILOG_USER_BURST), keyed by a salted
  64-bit hash so that no crafted name can share another user's bucket;
- a counter per (location, stream, reason) of the entries dropped, which apilogd turns into
  suppression notes and marks as noted.

A process that cannot take the lock within a millisecond (a member of the group holding it)
admits the entry uncounted rather than block the app; apilogd's recount of the spool
corrects the byte counters.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..core import fs
from . import ensure

if TYPE_CHECKING:
    from ..settings import Share

TABLE_NAME = "table"
FILE_MODE = 0o660  # producers of the group update it; its folder's sticky bit keeps it in place
MAGIC = b"APLT"
VERSION = 1
RATE_SLOTS = 8192  # buckets of locations active within a burst's time; a full bucket's slot is reused
NOTE_SLOTS = 1024  # (location, stream, reason) counters not yet noted
PROBES = 16  # slots looked at for a key before the least useful one is taken over
SHARE_BYTES = 64 * 1024  # a process adds its appends to the shared spool counter at least this often
LOCK_TRIES = 20  # LOCK_NB attempts (with a pause between) before admitting uncounted
OPEN_WAIT_TRIES = 500  # 10 ms waits for a table's creator to finish it
KEYS_KEPT = 4096  # locations whose bucket key a process remembers

RATE_LIMIT, SPOOL_FULL = 1, 2  # reasons a producer drops an entry (apilogd adds its own)
REASONS = {RATE_LIMIT: "rate limit", SPOOL_FULL: "spool full"}

_HEADER = struct.Struct("<4sIII16sQQ")  # magic, version, rate slots, note slots, salt, appended, drained
_RATE = struct.Struct("<Qd")  # key, theoretical arrival time (monotonic seconds)
_PROBED = struct.Struct("<" + "Qd" * PROBES)  # the slots a key may live in, read at once
_COUNTERS = struct.Struct("<QQ")
_U64 = struct.Struct("<Q")
# key, count, noted, last drop (wall clock), when last noted (wall clock), reason, stream, location
_NOTE = struct.Struct("<QQQddB33s256s")
_NOTE_SIZE = 384
HEADER_SIZE = 64
_APPENDED_AT = 4 + 4 + 4 + 4 + 16
_DRAINED_AT = _APPENDED_AT + 8
_RATES_AT = HEADER_SIZE
_NOTES_AT = _RATES_AT + RATE_SLOTS * _RATE.size
TABLE_SIZE = _NOTES_AT + NOTE_SLOTS * _NOTE_SIZE
OTHERS = ""  # the location of the catch-all counter used when every note slot is taken


@dataclass(frozen=True, slots=True)
class Dropped:
    """One counter of dropped entries, as apilogd reads it."""

    slot: int
    key: int
    count: int
    noted: int
    last: float
    noted_at: float
    reason: int
    stream: str
    location: str


def _fixed(text: str, size: int) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")[:size - 1]
    return bytes([len(raw)]) + raw


def _unfixed(raw: bytes) -> str:
    return raw[1:1 + raw[0]].decode("utf-8", "replace")


class Limits:
    """One process's handle on the table: admits or drops each entry, and counts what it drops."""

    def __init__(self, folder: Path, *, rate: float, burst: int, spool_max: int) -> None:
        self.rate = rate
        self.burst = burst
        self.spool_max = spool_max
        self.path = folder / TABLE_NAME
        self._thread_lock = threading.Lock()  # flock excludes other processes, not this one's threads
        self._fd = _open_table(self.path)
        self._salt = _HEADER.unpack(os.pread(self._fd, _HEADER.size, 0))[4]
        self._keys: dict[str, int] = {}  # location -> its bucket's key (a hash a call spared)
        self._unshared = 0  # bytes this process appended that the shared counter does not hold yet
        self._seen_waiting = 0  # what waited in the spool when this process last looked
        os.register_at_fork(after_in_child=self._reopen)  # a child must not share the parent's flock
        atexit.register(self.flush)

    def _reopen(self) -> None:
        self._thread_lock = threading.Lock()
        self._unshared = 0  # the parent's to share
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1
        with contextlib.suppress(OSError):
            self._fd = _open_table(self.path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _key(self, *parts: str) -> int:
        digest = hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogateescape"), digest_size=8, key=self._salt)
        return int.from_bytes(digest.digest(), "little") or 1  # 0 marks a free slot

    @contextlib.contextmanager
    def locked(self, *, wait: bool = False) -> Iterator[bool]:
        """Hold the table (True), or give up after about a millisecond (False) unless `wait`."""
        with self._thread_lock:
            held = self._flock(wait)
            try:
                yield held
            finally:
                if held:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _flock(self, wait: bool) -> bool:
        if self._fd < 0:
            return False
        for _ in range(LOCK_TRIES):
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.00005)
            else:
                return True
        return False

    # The producer's side: on every delay(), so written for speed (one lock, a few preads).

    def admit(self, location: str, streams: list[str], size: int, *, limited: bool) -> int:
        """0 when an entry of `size` spool bytes may be appended (and is counted as such), else the reason it is dropped.

        `limited`: the location is subject to the per-user rate (every one but the system's).
        The spool's byte counter is shared every SHARE_BYTES appended by this process, not on
        every call: the budget may be passed by that much per producing process (docs/operations.md, "Limits").
        """
        with self._thread_lock:
            if not self._flock(False):
                return 0
            fd = self._fd
            try:
                reason, crowded = 0, False
                if self.spool_max:
                    after = self._seen_waiting + self._unshared + size
                    if self._unshared + size > SHARE_BYTES or after > self.spool_max // 2:
                        self._share_appended()
                        after = self._seen_waiting + size
                    if after > self.spool_max:
                        reason = SPOOL_FULL
                    crowded = after > self.spool_max // 2
                if not reason and limited and self.rate:
                    reason = self._take_token(location, crowded)
                if reason:
                    now = time.time()
                    for stream in streams:
                        self._count(location, stream, reason, now)
                    return reason
                self._unshared += size
                return 0
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _share_appended(self) -> None:
        """Add this process's appends to the shared counter (the lock is held) and read what waits now."""
        appended, drained = _COUNTERS.unpack(os.pread(self._fd, 16, _APPENDED_AT))
        if self._unshared:
            appended += self._unshared
            fs.pwrite(self._fd, _U64.pack(appended), _APPENDED_AT)
            self._unshared = 0
        self._seen_waiting = appended - min(drained, appended)

    def flush(self) -> None:
        """Share what this process appended (at exit): a table that cannot be written any more is recounted by apilogd."""
        with self.locked() as held, contextlib.suppress(OSError):
            if held and self._unshared:
                self._share_appended()

    def unappend(self, size: int) -> None:
        """An admitted entry did not reach the spool after all: take its bytes back."""
        with self._thread_lock:
            self._unshared = max(0, self._unshared - size)

    def _take_token(self, location: str, crowded: bool) -> int:
        """GCRA: 0 when the bucket has a token, which is charged; else why not. A full bucket's slot is free for anyone.

        `crowded`: the spool is more than half full; then a user who spent more than half its
        burst is dropped as "spool full" already, so that one user's burst leaves room for the others.
        """
        key = self._keys.get(location)
        if key is None:
            if len(self._keys) >= KEYS_KEPT:
                self._keys.clear()
            key = self._keys[location] = self._key(location)
        now = time.monotonic()
        interval = 1.0 / self.rate
        tau = self.burst * interval
        at = _RATES_AT + (key % (RATE_SLOTS - PROBES)) * _RATE.size
        index, tat = self._slot(os.pread(self._fd, _PROBED.size, at), key, now)
        if tat > now + tau:  # a time from before a reboot
            tat = now
        new = max(tat, now) + interval
        if new - now > tau:
            return RATE_LIMIT
        if crowded and tat - now > tau / 2:
            return SPOOL_FULL
        fs.pwrite(self._fd, _RATE.pack(key, new), at + index * _RATE.size)
        return 0

    @staticmethod
    def _slot(raw: bytes, key: int, now: float) -> tuple[int, float]:
        """Where `key`'s bucket lives among the probed slots, and its time (`now` for a slot taken anew)."""
        k, tat = _RATE.unpack_from(raw, 0)
        if k == key:
            return 0, tat
        probed = _PROBED.unpack(raw)
        keys = probed[0::2]
        if key in keys:
            index = keys.index(key)
            return index, probed[2 * index + 1]
        # A free slot, or a bucket full again (as good as new); else the one closest to full is taken over.
        index = next((i for i in range(PROBES) if keys[i] == 0 or probed[2 * i + 1] <= now),
                     min(range(PROBES), key=lambda i: probed[2 * i + 1]))
        return index, now

    def _count(self, location: str, stream: str, reason: int, now: float, n: int = 1) -> None:
        key = self._key(location, stream, str(reason))
        first = key % (NOTE_SLOTS - PROBES)
        raw = os.pread(self._fd, PROBES * _NOTE_SIZE, _NOTES_AT + first * _NOTE_SIZE)
        free = None
        for i in range(PROBES):
            found = _NOTE.unpack_from(raw, i * _NOTE_SIZE)
            if found[0] == key:
                self._write_note(first + i, key, found[1] + n, found[2], now, found[4], reason, stream, location)
                return
            if found[0] == 0 and free is None:
                free = first + i
        if free is not None:
            self._write_note(free, key, n, 0, now, 0.0, reason, stream, location)
        elif location != OTHERS:
            self._count(OTHERS, stream, reason, now, n)  # every slot taken: counted among "other users", never lost

    def _write_note(self, index: int, key: int, count: int, noted: int, last: float, noted_at: float,
                    reason: int, stream: str, location: str) -> None:
        raw = _NOTE.pack(key, count, noted, last, noted_at, reason, _fixed(stream, 33), _fixed(location, 256))
        fs.pwrite(self._fd, raw, _NOTES_AT + index * _NOTE_SIZE)

    # apilogd's side (it holds the lock with `wait=True` around these).

    def counters(self) -> tuple[int, int]:
        """(appended, drained) spool bytes."""
        appended, drained = _COUNTERS.unpack(os.pread(self._fd, 16, _APPENDED_AT))
        return appended, drained

    def set_drained(self, drained: int) -> None:
        fs.pwrite(self._fd, _U64.pack(drained), _DRAINED_AT)

    def dropped(self) -> list[Dropped]:
        """Every counter in use."""
        raw = os.pread(self._fd, NOTE_SLOTS * _NOTE_SIZE, _NOTES_AT)
        found = []
        for index in range(NOTE_SLOTS):
            key, count, noted, last, noted_at, reason, stream, location = _NOTE.unpack_from(raw, index * _NOTE_SIZE)
            if key:
                found.append(Dropped(index, key, count, noted, last, noted_at, reason,
                                     _unfixed(stream), _unfixed(location)))
        return found

    def count(self, location: str, stream: str, reason: int, now: float, n: int) -> None:
        """Count `n` entries apilogd itself dropped (for disk space), to be noted like the producers' drops."""
        self._count(location, stream, reason, now, n)

    def mark_noted(self, slot: int, key: int, noted: int, when: float) -> None:
        """`noted` of the counter's entries are in a committed note now (never lowered: a redo marks again)."""
        current = _NOTE.unpack(os.pread(self._fd, _NOTE.size, _NOTES_AT + slot * _NOTE_SIZE))
        if current[0] == key:
            fs.pwrite(self._fd, _NOTE.pack(key, current[1], max(noted, current[2]), current[3], when, *current[5:]),
                      _NOTES_AT + slot * _NOTE_SIZE)

    def free(self, slot: int, key: int) -> None:
        """Forget a counter whose every drop is noted (its episode ended)."""
        current = _NOTE.unpack(os.pread(self._fd, _NOTE.size, _NOTES_AT + slot * _NOTE_SIZE))
        if current[0] == key and current[1] == current[2]:
            fs.pwrite(self._fd, bytes(_NOTE_SIZE), _NOTES_AT + slot * _NOTE_SIZE)


_opened: dict[tuple[Path, float, int, Share], Limits | None] = {}


def limits_for(spool_dir: Path, rate: float, burst: int, spool_max: Share) -> Limits | None:
    """This process's handle on the spool's table; None (nothing limited) when it cannot be opened or made."""
    key = (spool_dir, rate, burst, spool_max)
    if key in _opened:
        return _opened[key]
    found = None
    try:
        dirs = ensure(spool_dir)
        fs = os.statvfs(spool_dir)
        found = Limits(dirs["limits"], rate=rate, burst=burst, spool_max=spool_max.of(fs.f_blocks * fs.f_frsize))
    except OSError as exc:
        print(f"apilog: entries are not limited: the limits table cannot be used ({exc})", file=sys.stderr)
    _opened[key] = found
    return found


def _open_table(path: Path) -> int:
    """Open the table, creating it (full size, allocated: a full disk never fails a later write) if missing."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = fs.open(path, flags)
    except FileNotFoundError:
        fd = _create(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size < TABLE_SIZE:
            raise OSError(errno.EINVAL, f"{path} is not apilog's limits table")
        # Its creator holds it locked until the header is written (a few ms; seconds on a loaded machine); a
        # header still all zeros was opened between the creator's open and its lock.
        for _ in range(OPEN_WAIT_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            magic, version = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))[:2]
            fcntl.flock(fd, fcntl.LOCK_UN)
            if magic != bytes(4):
                break
            time.sleep(0.01)
        else:
            raise OSError(errno.EAGAIN, f"{path} was not made within {OPEN_WAIT_TRIES // 100} s")
        if magic != MAGIC or version != VERSION:
            raise OSError(errno.EINVAL, f"{path} is not apilog's limits table (version {version})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create(path: Path, flags: int) -> int:
    try:
        fd = fs.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return fs.open(path, flags)
    try:
        fs.fchmod(fd, FILE_MODE)  # not the umask's choice: every producer of the group writes it
        fcntl.flock(fd, fcntl.LOCK_EX)
        fs.fallocate(fd, 0, TABLE_SIZE)
        # What already waits in the spool counts against its budget from the first call on (apilogd recounts it).
        waiting = sum(entry.stat(follow_symlinks=False).st_size for entry in os.scandir(path.parent.parent / "segments")
                      if entry.is_file(follow_symlinks=False))
        fs.pwrite(fd, _HEADER.pack(MAGIC, VERSION, RATE_SLOTS, NOTE_SLOTS, secrets.token_bytes(16), waiting, 0), 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            fs.unlink(path)
        raise
    return fd
