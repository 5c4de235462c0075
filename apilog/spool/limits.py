"""The producers' shared limits: each user's token bucket, the spool's byte budget, and counts of what was dropped.

Every process that calls `delay()` on one host shares one small table file,
`spool/limits/table`, read and written with `pread`/`pwrite` under `flock` (never mapped:
a member of the group who cut the file would otherwise crash every app with SIGBUS). It holds:

- the bytes producers appended to the spool and the bytes apilogd drained from it (their
  difference is what waits, checked against APILOG_SPOOL_MAX before each append);
- per location, keyed by a salted 64-bit hash (no crafted name shares another's bucket), a
  GCRA bucket of entries (APILOG_USER_RATE, APILOG_USER_BURST) and one of spool bytes (a
  quarter of the spool's budget a minute): past half the spool's budget, a user who spent
  half of either is dropped as "spool full" already, so one user's burst leaves room for
  the others;
- a counter per (location, stream, reason) of the entries dropped, which apilogd turns into
  suppression notes and marks as noted; a few slots are kept for "other users", so a full
  counter table still counts.

The table is input from every member of the app's group, so nothing here may hang, crash or
lose an entry because of it: a lock not had within a millisecond, a table cut short, garbage
or counters past any real value make `delay()` admit the entry uncounted; apilogd replaces a
damaged table (every process notices the new one within a second) and recounts the spool.
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
VERSION = 2
RATE_SLOTS = 8192  # buckets of locations active within a burst's time; a full bucket's slot is reused
NOTE_SLOTS = 1024  # (location, stream, reason) counters not yet noted
RESERVED = 8  # the last note slots: one "other users" counter per reason, used when the rest are taken
PROBES = 16  # slots looked at for a key before the least useful one is taken over
SHARE_BYTES = 64 * 1024  # a process adds its appends to the shared spool counter at least this often
LOCK_TRIES = 2000  # attempts at a lock of the table (yields, then short pauses) before giving up on it for this call
LOCK_WAIT = 0.02  # seconds those attempts may take at most (a holder descheduled for a timeslice)
LOCK_WAIT_MIN = 0.0005  # ... and at least, once locks are not had (a member of the group holds the table)
RECHECK_EVERY = 1.0  # seconds between looks at whether the table was replaced (by apilogd, after damage)
RETRY_AFTER = 1.0  # seconds before a process that could not open the table tries again
KEYS_KEPT = 4096  # locations whose bucket key a process remembers
BYTES_WINDOW = 60.0  # a user's spool bytes bucket refills a quarter of the spool's budget in this time
MAX_COUNT = 1 << 62  # no real counter gets near this: a larger one was written by someone else

RATE_LIMIT, SPOOL_FULL = 1, 2  # reasons a producer drops an entry (apilogd adds its own)
REASONS = {RATE_LIMIT: "rate limit", SPOOL_FULL: "spool full"}

_HEADER = struct.Struct("<4sIII16sQQ")  # magic, version, rate slots, note slots, salt, appended, drained
_RATE = struct.Struct("<Qdd")  # key, arrival time of entries, arrival time of bytes (monotonic seconds)
_PROBED = struct.Struct("<" + "Qdd" * PROBES)  # the slots a key may live in, read at once
_FLOCK = struct.Struct("hhqqi")  # Linux's struct flock: type, whence, start, length, pid (0 for an OFD lock)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_COUNTERS = struct.Struct("<QQ")
_U64 = struct.Struct("<Q")
# key, count, noted, first drop, last drop, when last noted (wall clock), reason, stream, location
_NOTE = struct.Struct("<QQQdddB33s256s")
_NOTE_SIZE = 384
HEADER_SIZE = 64
_APPENDED_AT = 4 + 4 + 4 + 4 + 16
_DRAINED_AT = _APPENDED_AT + 8
_RATES_AT = HEADER_SIZE
_NOTES_AT = _RATES_AT + RATE_SLOTS * _RATE.size
TABLE_SIZE = _NOTES_AT + NOTE_SLOTS * _NOTE_SIZE
OTHERS = ""  # the location of the "other users" counters


class TableDamaged(OSError):
    """The table is cut short, or holds what apilog never writes: apilogd replaces it."""


@dataclass(frozen=True, slots=True)
class Dropped:
    """One counter of dropped entries, as apilogd reads it."""

    slot: int
    key: int
    count: int
    noted: int
    first: float  # when its first drop happened: with the count, it names a note (a retried note keeps its id)
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


def _read(fd: int, size: int, at: int) -> bytes:
    raw = os.pread(fd, size, at)
    if len(raw) != size:
        raise TableDamaged(errno.EINVAL, f"the limits table is cut short (at byte {at})")
    return raw


def _count_value(value: int) -> int:
    if value > MAX_COUNT:
        raise TableDamaged(errno.EINVAL, f"the limits table holds a count no producer wrote ({value})")
    return value


class Limits:
    """One process's handle on the table: admits or drops each entry, and counts what it drops."""

    def __init__(self, folder: Path, *, rate: float, burst: int, spool_max: int) -> None:
        self.rate = rate
        self.burst = burst
        self.spool_max = spool_max
        self.path = folder / TABLE_NAME
        self._thread_lock = threading.Lock()  # file locks exclude other processes, not this one's threads
        self._fd, self._ino, self._salt = -1, 0, b""
        self._checked = 0.0  # when this process last looked whether the table was replaced
        self._patience = LOCK_WAIT  # how long a lock of the table is waited for now
        self._keys: dict[str, int] = {}  # location -> its bucket's key (a hash a call spared)
        self._unshared = 0  # bytes this process appended that the shared counter does not hold yet
        self._seen_waiting = 0  # what waited in the spool when this process last looked
        self._open()
        os.register_at_fork(after_in_child=self._reopen)  # a child must not share the parent's locks
        atexit.register(self.flush)

    def _open(self) -> None:
        """(Again) the table at its path; on failure this process goes on unlimited and tries again later."""
        with contextlib.suppress(OSError):
            if self._fd >= 0:
                os.close(self._fd)
        self._fd = -1
        self._checked = time.monotonic()
        with contextlib.suppress(OSError):
            self._fd, self._ino, self._salt = open_table(self.path)
        self._keys.clear()

    def _reopen(self) -> None:
        self._thread_lock = threading.Lock()
        self._unshared = 0  # the parent's to share
        self._open()

    def _current(self) -> bool:
        """Whether the table is open, reopening it when apilogd replaced it (looked at once a second)."""
        now = time.monotonic()
        if now - self._checked >= (RECHECK_EVERY if self._fd >= 0 else RETRY_AFTER):
            self._checked = now
            try:
                replaced = os.stat(self.path, follow_symlinks=False).st_ino != self._ino
            except OSError:
                replaced = True
            if replaced or self._fd < 0:
                self._open()
        return self._fd >= 0

    def _key(self, *parts: str) -> int:
        digest = hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogateescape"), digest_size=8, key=self._salt)
        return int.from_bytes(digest.digest(), "little") or 1  # 0 marks a free slot

    def _lock(self, start: int, length: int, tries: int = LOCK_TRIES) -> bool:
        """Lock a range of the table (0, 0: all of it) for this open file, or give up after `tries` yields.

        Byte-range locks (OFD: per open file, like flock): producers of different users, whose
        buckets lie apart, never wait for each other; apilogd's whole-file lock excludes them all.
        """
        arg = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        deadline = 0.0
        for attempt in range(tries):
            try:
                fcntl.fcntl(self._fd, _F_OFD_SETLK, arg)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            else:
                self._patience = min(LOCK_WAIT, self._patience * 2)
                return True
            # A holder needs microseconds, unless the scheduler took its core (then a timeslice): yield first, then
            # pause. Patience halves at each lock not had, so a member of the group holding it for good costs each
            # call a fraction of a millisecond, and doubles back at each lock had.
            now = time.monotonic()
            deadline = deadline or now + self._patience * tries / LOCK_TRIES
            if now > deadline:
                break
            if attempt < 8:
                os.sched_yield()
            else:
                time.sleep(0.0001)
        self._patience = max(LOCK_WAIT_MIN, self._patience / 4)
        return False

    def _unlock(self, start: int, length: int) -> None:
        fcntl.fcntl(self._fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, length, 0))

    @contextlib.contextmanager
    def _range(self, start: int, length: int) -> Iterator[bool]:
        held = self._lock(start, length)
        try:
            yield held
        finally:
            if held:
                self._unlock(start, length)

    @contextlib.contextmanager
    def locked(self, tries: int = LOCK_TRIES) -> Iterator[bool]:
        """Hold the whole table (True), or give up after `tries` yields (False): a member of the group may hold it."""
        with self._thread_lock:
            held = self._current() and self._lock(0, 0, tries)
            try:
                yield held
            finally:
                if held:
                    self._unlock(0, 0)

    # The producer's side: on every delay(), so written for speed (a range lock, a pread and a pwrite).

    def admit(self, location: str, streams: list[str], size: int, *, limited: bool) -> int:
        """0 when an entry of `size` spool bytes may be appended (and is counted as such), else the reason it is dropped.

        `limited`: the location is subject to the per-user rate (every one but the system's).
        The spool's byte counter is shared every SHARE_BYTES appended by this process, not on
        every call: the budget may be passed by that much per producing process.
        """
        with self._thread_lock:
            if not self._current():
                return 0
            try:
                return self._admit(location, streams, size, limited)
            except (OSError, struct.error, OverflowError, ValueError):  # a damaged table: never the app's problem
                self._checked = 0.0  # look for apilogd's replacement at the next call
                return 0

    def _admit(self, location: str, streams: list[str], size: int, limited: bool) -> int:
        """The checks, each under its range's lock; a lock not had in time admits the entry uncounted (never stalls)."""
        reason, crowded = 0, False
        if self.spool_max:
            after = self._seen_waiting + self._unshared + size
            if self._unshared + size > SHARE_BYTES or after > self.spool_max // 2:
                with self._range(0, HEADER_SIZE) as held:
                    if held:
                        self._share_appended()
                        after = self._seen_waiting + size
            if after > self.spool_max:
                reason = SPOOL_FULL
            crowded = after > self.spool_max // 2
        if not reason and limited and (self.rate or crowded):
            reason = self._take_token(location, size, crowded)
        if reason:
            now = time.time()
            if not all(self._count(location, stream, reason, now) for stream in streams):
                return 0  # a drop that cannot be counted is not made
            return reason
        self._unshared += size
        return 0

    def _share_appended(self) -> None:
        """Add this process's appends to the shared counter (the lock is held) and read what waits now."""
        appended, drained = map(_count_value, _COUNTERS.unpack(_read(self._fd, 16, _APPENDED_AT)))
        if self._unshared:
            appended += self._unshared
            fs.pwrite(self._fd, _U64.pack(appended), _APPENDED_AT)
            self._unshared = 0
        self._seen_waiting = appended - min(drained, appended)

    def flush(self) -> None:
        """Share what this process appended (at exit): a table that cannot be written any more is recounted by apilogd."""
        with self._thread_lock, contextlib.suppress(OSError, struct.error, OverflowError, ValueError):
            if self._unshared and self._fd >= 0 and self._lock(0, HEADER_SIZE):
                self._share_appended()
                self._unlock(0, HEADER_SIZE)

    def unappend(self, size: int) -> None:
        """An admitted entry did not reach the spool after all: take its bytes back."""
        with self._thread_lock:
            self._unshared = max(0, self._unshared - size)

    def _take_token(self, location: str, size: int, crowded: bool) -> int:
        """GCRA: 0 when the bucket has a token, which is charged; else why not. A full bucket's slot is free for anyone.

        `crowded`: the spool is more than half full; then a user who spent more than half its
        burst of entries, or of spool bytes, is dropped as "spool full" already.
        """
        key = self._keys.get(location)
        if key is None:
            if len(self._keys) >= KEYS_KEPT:
                self._keys.clear()
            key = self._keys[location] = self._key(location)
        at = _RATES_AT + (key % (RATE_SLOTS - PROBES)) * _RATE.size
        with self._range(at, _PROBED.size) as held:
            return self._charge(at, key, size, crowded) if held else 0

    def _charge(self, at: int, key: int, size: int, crowded: bool) -> int:
        """The GCRA of `key`'s buckets, whose slots start at `at` (their range is locked)."""
        now = time.monotonic()
        interval = 1.0 / self.rate if self.rate else 0.0
        tau = self.burst * interval
        per_byte = BYTES_WINDOW / max(1, self.spool_max // 4)
        index, tat, bytes_tat = self._slot(_read(self._fd, _PROBED.size, at), key, now)
        if not now - 1 <= tat <= now + tau + 1:  # a time from before a reboot, or someone else's
            tat = now
        if not now - 1 <= bytes_tat <= now + 2 * BYTES_WINDOW + 1:
            bytes_tat = now
        new = max(tat, now) + interval
        if self.rate and new - now > tau:
            return RATE_LIMIT
        if crowded and (tat - now > tau / 2 > 0 or bytes_tat - now > BYTES_WINDOW / 2):
            return SPOOL_FULL
        new_bytes = min(max(bytes_tat, now) + size * per_byte, now + 2 * BYTES_WINDOW)
        fs.pwrite(self._fd, _RATE.pack(key, new, new_bytes), at + index * _RATE.size)
        return 0

    @staticmethod
    def _slot(raw: bytes, key: int, now: float) -> tuple[int, float, float]:
        """Where `key`'s buckets live among the probed slots, and their times (`now` for a slot taken anew)."""
        k, tat, bytes_tat = _RATE.unpack_from(raw, 0)
        if k == key:
            return 0, tat, bytes_tat
        probed = _PROBED.unpack(raw)
        keys = probed[0::3]
        if key in keys:
            index = keys.index(key)
            return index, probed[3 * index + 1], probed[3 * index + 2]
        # A free slot, or buckets full again (as good as new); else the one closest to full is taken over.
        index = next((i for i in range(PROBES) if keys[i] == 0 or max(probed[3 * i + 1], probed[3 * i + 2]) <= now),
                     min(range(PROBES), key=lambda i: probed[3 * i + 1]))
        return index, now, now

    def _count(self, location: str, stream: str, reason: int, now: float, n: int = 1, *, lock: bool = True) -> bool:
        """Count `n` drops (False: the counters could not be had); when every slot near the key is taken, in the
        reserved "other users" counter of the reason. `lock`: take the counters' range (apilogd holds the whole table)."""
        key = self._key(location, stream, str(reason))
        first = key % (NOTE_SLOTS - PROBES - RESERVED)
        at = _NOTES_AT + first * _NOTE_SIZE
        with self._range(at, PROBES * _NOTE_SIZE) if lock else contextlib.nullcontext(True) as held:
            if not held:
                return False
            raw = _read(self._fd, PROBES * _NOTE_SIZE, at)
            free = None
            for i in range(PROBES):
                found = _NOTE.unpack_from(raw, i * _NOTE_SIZE)
                if found[0] == key:
                    self._write_note(first + i, key, _count_value(found[1]) + n, found[2], found[3], now, found[5],
                                     reason, stream, location)
                    return True
                if found[0] == 0 and free is None:
                    free = first + i
            if free is not None:
                self._write_note(free, key, n, 0, now, now, 0.0, reason, stream, location)
                return True
        slot = NOTE_SLOTS - 1 - reason % RESERVED  # every slot taken: among "other users", never lost
        key = self._key(OTHERS, "", str(reason))
        at = _NOTES_AT + slot * _NOTE_SIZE
        with self._range(at, _NOTE_SIZE) if lock else contextlib.nullcontext(True) as held:
            if not held:
                return False
            found = _NOTE.unpack(_read(self._fd, _NOTE.size, at))
            if found[0] == key:
                self._write_note(slot, key, _count_value(found[1]) + n, found[2], found[3], now, found[5], reason, "",
                                 OTHERS)
            else:
                self._write_note(slot, key, n, 0, now, now, 0.0, reason, "", OTHERS)
            return True

    def _write_note(self, index: int, key: int, count: int, noted: int, first: float, last: float, noted_at: float,
                    reason: int, stream: str, location: str) -> None:
        raw = _NOTE.pack(key, count, noted, first, last, noted_at, reason, _fixed(stream, 33), _fixed(location, 256))
        fs.pwrite(self._fd, raw, _NOTES_AT + index * _NOTE_SIZE)

    # apilogd's side (it holds the lock around these; each raises TableDamaged on a table it must replace).

    def counters(self) -> tuple[int, int]:
        """(appended, drained) spool bytes."""
        appended, drained = map(_count_value, _COUNTERS.unpack(_read(self._fd, 16, _APPENDED_AT)))
        return appended, drained

    def set_drained(self, drained: int) -> None:
        fs.pwrite(self._fd, _U64.pack(min(drained, MAX_COUNT)), _DRAINED_AT)

    def dropped(self) -> list[Dropped]:
        """Every counter in use."""
        raw = _read(self._fd, NOTE_SLOTS * _NOTE_SIZE, _NOTES_AT)
        found = []
        for index in range(NOTE_SLOTS):
            key, count, noted, first, last, noted_at, reason, stream, location = _NOTE.unpack_from(raw, index * _NOTE_SIZE)
            if key:
                found.append(Dropped(index, key, _count_value(count), min(noted, count), first, last, noted_at, reason,
                                     _unfixed(stream), _unfixed(location)))
        return found

    def count(self, location: str, stream: str, reason: int, now: float, n: int) -> None:
        """Count `n` entries apilogd itself dropped (for disk space), to be noted like the producers' drops."""
        self._count(location, stream, reason, now, n, lock=False)

    def mark_noted(self, slot: int, key: int, noted: int, when: float) -> None:
        """`noted` of the counter's entries are in a committed note now (never lowered: a redo marks again)."""
        current = _NOTE.unpack(_read(self._fd, _NOTE.size, _NOTES_AT + slot * _NOTE_SIZE))
        if current[0] == key:
            fs.pwrite(self._fd, _NOTE.pack(*current[:2], max(noted, current[2]), *current[3:5], when, *current[6:]),
                      _NOTES_AT + slot * _NOTE_SIZE)

    def free(self, slot: int, key: int) -> None:
        """Forget a counter whose every drop is noted (its episode ended)."""
        current = _NOTE.unpack(_read(self._fd, _NOTE.size, _NOTES_AT + slot * _NOTE_SIZE))
        if current[0] == key and current[1] == current[2]:
            fs.pwrite(self._fd, bytes(_NOTE_SIZE), _NOTES_AT + slot * _NOTE_SIZE)

    def replace(self, waiting: int) -> None:
        """Put a fresh table in place of a damaged one (apilogd: its folder's owner may, sticky bit or not)."""
        fd, tmp = _made(self.path, waiting)
        try:
            fs.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                fs.unlink(tmp)
            raise
        os.close(fd)
        self._open()


_opened: dict[tuple[Path, float, int, Share], Limits] = {}
_said: set[str] = set()


def limits_for(spool_dir: Path, rate: float, burst: int, spool_max: Share) -> Limits | None:
    """This process's handle on the spool's table (which retries a table it cannot use); None without a spool."""
    key = (spool_dir, rate, burst, spool_max)
    found = _opened.get(key)
    if found is None:
        try:
            dirs = ensure(spool_dir)
            size = os.statvfs(spool_dir)
        except OSError as exc:
            _say_once(f"apilog: entries are not limited: the spool cannot be used ({exc})")
            return None
        found = _opened[key] = Limits(dirs["limits"], rate=rate, burst=burst,
                                      spool_max=spool_max.of(size.f_blocks * size.f_frsize))
    return found


def _say_once(text: str) -> None:
    if text not in _said:
        _said.add(text)
        print(text, file=sys.stderr)


def open_table(path: Path) -> tuple[int, int, bytes]:
    """(descriptor, inode, salt) of the table, made (whole, then linked into place) if missing; OSError if unusable."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = fs.open(path, flags)
    except FileNotFoundError:
        fd, tmp = _made(path, _waiting(path))
        try:
            fs.link(tmp, path)  # appears whole, or not at all; another process's table may have come first
        except FileExistsError:
            os.close(fd)
            fd = fs.open(path, flags)
        finally:
            with contextlib.suppress(OSError):
                fs.unlink(tmp)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size < TABLE_SIZE:
            raise TableDamaged(errno.EINVAL, f"{path} is not apilog's limits table (a link, or cut short)")
        magic, version, *_, salt, _appended, _drained = _HEADER.unpack(_read(fd, _HEADER.size, 0))
        if magic != MAGIC or version != VERSION:
            raise TableDamaged(errno.EINVAL, f"{path} is not apilog's limits table (version {version})")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_ino, salt


def _waiting(path: Path) -> int:
    """What already waits in the spool (all of its segments: a new table cannot tell what was drained)."""
    try:
        return sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(path.parent.parent / "segments")
                   if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


def _made(path: Path, waiting: int) -> tuple[int, Path]:
    """A new table beside `path` under a name of its own, whole (header written, room allocated): (descriptor, path)."""
    tmp = path.with_name(f".{TABLE_NAME}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = fs.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        fs.fchmod(fd, FILE_MODE)  # not the umask's choice: every producer of the group writes it
        fs.fallocate(fd, 0, TABLE_SIZE)  # a full disk never fails a later write
        fs.pwrite(fd, _HEADER.pack(MAGIC, VERSION, RATE_SLOTS, NOTE_SLOTS, secrets.token_bytes(16), waiting, 0), 0)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            fs.unlink(tmp)
        raise
    return fd, tmp
