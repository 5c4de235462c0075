"""The consumer side of the spool: records read in order from each producer's segments.

Everything in `segments/` is input from other processes and is treated as such: only
regular files with one link are read, through the folder's descriptor; a bounded number
of segments is held open at a time, however many producers there are.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from apilog.core import fs
from apilog.core.folder import Folder
from apilog.spool.backlog import rejection
from apilog.spool.frame import CHUNK, HEADER, MAGIC, MAX_PAYLOAD, boundaries

MAX_DAMAGED = 1024 * 1024  # garbage is quarantined in pieces of at most this size
MAX_GARBAGE_KEPT = 16 * 1024 * 1024  # per segment; beyond it garbage is skipped and said so, not copied
RESYNC_CHECK = 64 * 1024  # longest candidate record whose checksum is tried while skipping garbage
STALE_TMP_SECONDS = 60
SEAL_RECHECK = 1.0  # seconds between lock checks of a live producer's segment that does not grow
MAX_OPEN_SEGMENTS = 256  # descriptors held at once; the rest are reopened by name when their turn comes


@dataclass(slots=True)
class Record:
    """One framed message, or a damaged stretch of a segment (`damaged` says why)."""

    segment: str
    start: int
    end: int
    payload: bytes
    damaged: str | None = None


class _Segment:
    """A segment file, how far it has been read, and (while it is among the open ones) its descriptor."""

    def __init__(self, name: str, st: os.stat_result, pos: int) -> None:
        self.name = name
        self.identity = (st.st_dev, st.st_ino)  # when first seen: a replaced file is not the same segment
        self.fd = -1
        self.pos = pos
        self.sealed = False
        self.garbage = 0  # bytes of it quarantined so far
        self.quiet: tuple[int, float] | None = None  # (size, recheck at) while it waits for its producer
        self.n_later = 0  # later segments of its producer (set by read): then it is final
        producer, self.seq = _split_name(name)
        # A producer is its name *and* the file's owner: another member of the group cannot
        # slip a file into someone else's sequence (their order, their seal) by naming it alike.
        self.producer = (st.st_uid, producer)

    def check_sealed(self) -> bool:
        """True once no producer holds the segment: its content is final."""
        if not self.sealed:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                self.sealed = True
            except BlockingIOError:
                pass
        return self.sealed


def _split_name(name: str) -> tuple[str, int]:
    producer, _, rest = name.partition(".")
    seq, _, suffix = rest.partition(".")
    if suffix == "seg" and seq.isdigit():
        return producer, int(seq)
    return name, 0  # a foreign file: its own producer


def _resync(buf: bytes, start: int) -> int:
    """Where the next record may begin after damaged bytes: the damage ends as one stretch, not one per `APL1`."""
    pos = start
    while (nxt := buf.find(MAGIC, pos)) >= 0:
        if len(buf) - nxt < HEADER.size:
            return nxt  # cannot tell yet
        _, length, crc = HEADER.unpack_from(buf, nxt)
        end = nxt + HEADER.size + length
        if length <= MAX_PAYLOAD and (end > len(buf) or length > RESYNC_CHECK or
                                      zlib.crc32(buf[nxt + HEADER.size:end]) == crc):
            return nxt  # a whole record, or one too long to check here: parsed on its own
        pos = nxt + 1
    return len(buf)


class SpoolReader:
    """Reads records from every producer's segments, in each producer's order."""

    def __init__(self, segments: Folder, committed: Mapping[str, int], *, max_open: int = MAX_OPEN_SEGMENTS) -> None:
        self.segments = segments
        self.max_open = max_open
        self._segments: dict[str, _Segment] = {}
        self._open: OrderedDict[str, _Segment] = OrderedDict()  # least recently used first
        self._committed = dict(committed)
        self._start = 0  # rotates which producer a batch starts with, for fairness
        self.vanished: list[str] = []  # segments their owners removed, for the ledger to forget
        self.watched = False  # True once something calls touched() for every append (inotify)
        self._groups: list[list[_Segment]] | None = None  # segments by producer, in order; None: to be made
        self.rejected: dict[str, str] = {}  # spool entries set aside -> why, each reported once
        self.fresh_rejections: list[tuple[str, str]] = []  # not reported yet

    def close(self) -> None:
        while self._open:
            self._close(next(iter(self._open.values())))
        self._segments.clear()
        self._groups = None

    def _reject(self, name: str, why: str) -> None:
        if name not in self.rejected:
            self.rejected[name] = why
            self.fresh_rejections.append((name, why))

    def scan(self) -> None:
        """Pick up segments that appeared since the last scan; note (once) entries that are not segments."""
        names = self.segments.names()
        present = set(names)
        for gone in [n for n in self.rejected if n not in present]:
            del self.rejected[gone]
        for name in names:
            if name in self._segments or name in self.rejected or name.startswith("."):
                continue
            try:
                st = self.segments.stat(name)
            except FileNotFoundError:
                continue
            why = rejection(st)
            if why is not None:
                self._reject(name, why)
                continue
            self._segments[name] = _Segment(name, st, self._committed.get(name, 0))
            self._groups = None

    def _fd(self, seg: _Segment) -> int:
        """The segment's descriptor, reopened if it was closed to stay within the bound."""
        if seg.fd >= 0:
            self._open.move_to_end(seg.name)
            return seg.fd
        while len(self._open) >= self.max_open:
            self._close(next(iter(self._open.values())))
        fd = self.segments.open_regular(seg.name)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != seg.identity or rejection(st) is not None:
            os.close(fd)
            raise OSError(errno.ESTALE, f"{seg.name} was replaced while it was being read")
        seg.fd = fd
        self._open[seg.name] = seg
        return fd

    def _close(self, seg: _Segment) -> None:
        self._open.pop(seg.name, None)
        if seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1

    def _usable(self, seg: _Segment) -> bool:
        """Open the segment for this round; a file that vanished, or was swapped or closed to us, is set aside."""
        try:
            self._fd(seg)
        except OSError as exc:
            self._segments.pop(seg.name, None)
            self._groups = None
            if exc.errno == errno.ENOENT:
                self.vanished.append(seg.name)
            else:
                self._reject(seg.name, f"cannot be read: {exc.strerror or exc}")
            return False
        return True

    def _by_producer(self) -> list[list[_Segment]]:
        if self._groups is None:  # made again only when segments come or go
            groups: dict[tuple[int, str], list[_Segment]] = {}
            for seg in self._segments.values():
                groups.setdefault(seg.producer, []).append(seg)
            self._groups = [sorted(g, key=lambda s: s.seq) for _, g in sorted(groups.items())]
        ordered = self._groups
        if ordered:
            self._start = (self._start + 1) % len(ordered)
            ordered = ordered[self._start:] + ordered[: self._start]
        return ordered

    def read(self, max_records: int, max_bytes: int) -> list[Record]:
        """Up to the limits, the next records of every producer; a producer's next segment waits for the one before."""
        out: list[Record] = []
        size = 0
        for group in self._by_producer():
            for n, seg in enumerate(group):
                seg.n_later = len(group) - n - 1
                if seg.n_later:
                    # Its producer made a later segment, which it does only once this one is closed: final,
                    # whoever else holds a lock on it (any member of the group can flock a file it can read).
                    seg.sealed = True
                if self._quiet(seg) or not self._usable(seg):
                    break
                for record in self._records(seg):
                    out.append(record)
                    size += record.end - record.start
                    if len(out) >= max_records or size >= max_bytes:
                        return out
                if not (seg.sealed and seg.pos >= os.fstat(seg.fd).st_size):
                    if not seg.sealed:  # read to its end, its producer alive: look again when it grows
                        seg.quiet = (seg.pos, time.monotonic() + self._recheck_after())
                    break  # this producer's later segments wait until this one is final and read
        return out

    def _recheck_after(self) -> float:
        """Seconds until a quiet segment's lock is checked again.

        More held segments than descriptors means each check reopens one: spread the checks
        so they cost the same as with every segment open (a seal is then seen a little later).
        """
        return SEAL_RECHECK * max(1.0, len(self._segments) / self.max_open)

    def _quiet(self, seg: _Segment) -> bool:
        """A live producer's segment read to its end that has not grown: skipped without opening it.

        Thousands of segments held open (by live producers, or by someone holding them on
        purpose) then cost nothing while watched (a stat each per look where inotify is not
        to be had), and a lock check once a second.
        """
        if seg.quiet is None or seg.n_later:
            return False
        pos, until = seg.quiet
        if self.watched:
            grown = False  # touched() wakes it when its producer appends
        else:
            try:
                grown = self.segments.stat(seg.name).st_size != pos
            except FileNotFoundError:
                grown = True  # _usable() forgets it
        if grown or time.monotonic() >= until:
            seg.quiet = None
            return False
        return True

    def _records(self, seg: _Segment) -> Iterator[Record]:
        buf, base, fresh = b"", seg.pos, False
        while True:
            record = self._parse(seg, buf, seg.pos - base)
            if record is not None:
                seg.pos = record.end
                fresh = False
                yield record
                continue
            if not fresh:
                buf, base, fresh = self._fill(seg), seg.pos, True
                continue
            # No whole record past seg.pos in the file right now.
            if not seg.sealed:
                if not seg.check_sealed():
                    return  # its producer is alive: the rest is still being written
                fresh = False  # sealed just now: its content is final, read it once more
                continue
            rest = buf[seg.pos - base :]
            if not rest:
                return
            record = self._damaged(seg, rest, "torn record at the end of a sealed segment")
            seg.pos = record.end
            yield record

    @staticmethod
    def _fill(seg: _Segment) -> bytes:
        buf = os.pread(seg.fd, CHUNK, seg.pos)
        if len(buf) == CHUNK:
            magic, length, _ = HEADER.unpack_from(buf, 0)
            if magic == MAGIC and HEADER.size + length > CHUNK and length <= MAX_PAYLOAD:
                buf = os.pread(seg.fd, HEADER.size + length, seg.pos)  # one record larger than a chunk
        return buf

    def _parse(self, seg: _Segment, buf: bytes, off: int) -> Record | None:
        """The record at `off`, a damaged stretch, or None when the record is not all there yet."""
        if len(buf) - off < HEADER.size:
            return None
        magic, length, crc = HEADER.unpack_from(buf, off)
        if magic != MAGIC or length > MAX_PAYLOAD:
            return self._damaged(seg, buf[off:_resync(buf, off + 1)], "bytes that are not a framed record")
        end = off + HEADER.size + length
        if end > len(buf):
            return None
        payload = buf[off + HEADER.size : end]
        if zlib.crc32(payload) != crc:
            if not seg.check_sealed():
                return None  # a producer may still be writing it
            return self._damaged(seg, buf[off:end], "record whose checksum does not match")
        return Record(seg.name, seg.pos, seg.pos + HEADER.size + length, payload)

    @staticmethod
    def _damaged(seg: _Segment, raw: bytes, why: str) -> Record:
        if seg.garbage >= MAX_GARBAGE_KEPT:
            # Past this much garbage (a sparse 4 GB file costs its owner nothing) the rest is skipped, not kept.
            end = max(seg.pos + len(raw), os.fstat(seg.fd).st_size if seg.sealed else 0)
            return Record(seg.name, seg.pos, end, b"",
                          damaged=f"{why}; {end - seg.pos} bytes skipped, not kept: over "
                                  f"{MAX_GARBAGE_KEPT >> 20} MB of garbage from this segment")
        raw = raw[:MAX_DAMAGED]
        seg.garbage += len(raw)
        return Record(seg.name, seg.pos, seg.pos + len(raw), raw, damaged=why)

    def touched(self, names: set[str] | None) -> None:
        """Segments that changed (inotify on the folder; None: any may have): look at them again at once."""
        for name in self._segments if names is None else names:
            seg = self._segments.get(name)
            if seg is not None:
                seg.quiet = None

    def inode(self, name: str) -> int:
        """The inode a segment had when first seen (names are reused; inodes tell files apart)."""
        seg = self._segments.get(name)
        return seg.identity[1] if seg is not None else 0

    def rewind(self, committed: Mapping[str, int]) -> None:
        """Forget reads past the committed offsets (a batch failed and will be read again)."""
        self._committed = dict(committed)
        for seg in self._segments.values():
            seg.pos = self._committed.get(seg.name, 0)

    def commit(self, offsets: Mapping[str, int]) -> None:
        self._committed.update(offsets)

    def waiting_bytes(self) -> int:
        """Bytes in known segments past their committed offsets."""
        total = 0
        for seg in self._segments.values():
            try:
                total += max(0, self.segments.stat(seg.name).st_size - self._committed.get(seg.name, 0))
            except FileNotFoundError:
                continue
        return total

    def drained(self) -> list[str]:
        """Segments that are sealed and committed to their end: ready to be removed."""
        done = []
        now = time.monotonic()
        for seg in list(self._segments.values()):
            if seg.quiet is not None and now < seg.quiet[1]:
                continue  # its producer held it a moment ago (read() looks at its size): not final yet
            committed = self._committed.get(seg.name, 0)
            try:
                if seg.fd < 0 and committed < self.segments.stat(seg.name).st_size:
                    continue  # not read to its end yet: no need to open it for this question
            except FileNotFoundError:  # its owner removed it (the sticky bit lets a producer remove its own)
                self._segments.pop(seg.name, None)
                self._groups = None
                self.vanished.append(seg.name)
                continue
            if self._usable(seg) and seg.check_sealed() and committed >= os.fstat(seg.fd).st_size:
                done.append(seg.name)
        return done

    def remove(self, name: str) -> None:
        """Delete a drained segment."""
        seg = self._segments.pop(name)
        self._groups = None
        self._close(seg)
        self._committed.pop(name, None)
        self.segments.unlink(name)

    def sweep_tmp(self, tmp: Folder) -> list[tuple[str, bytes, int]]:
        """Clear `tmp/` of what producers left there; return name, first bytes and size of anything with bytes in it.

        A producer renames a segment out of `tmp/` before it writes to it, so what has bytes
        there was never a message `delay()` accepted; it is handed back to be quarantined all the same.
        """
        now = time.time()
        found = []
        for name in tmp.names():
            try:
                st = tmp.stat(name)
                if now - st.st_mtime <= STALE_TMP_SECONDS:
                    continue  # a producer may be about to rename it into place
                if stat.S_ISREG(st.st_mode) and st.st_size and st.st_nlink == 1:
                    fd = tmp.open_regular(name)
                    try:  # checked again once open: a hard link swapped in meanwhile is not copied out
                        if rejection(os.fstat(fd)) is None:
                            found.append((name, os.pread(fd, MAX_DAMAGED, 0), st.st_size))
                    finally:
                        os.close(fd)
                if stat.S_ISDIR(st.st_mode):
                    fs.rmdir(name, dir_fd=tmp.fd)
                else:
                    tmp.unlink(name)
            except OSError:
                continue  # a non-empty folder, or gone already: tried again at the next sweep
        return found


def offset_problem(segments: Folder, name: str, offset: int) -> str | None:
    """What is wrong with `offset` as the committed end of segment `name`, or None (a missing segment has none)."""
    try:
        fd = segments.open_regular(name)
    except OSError:
        return None  # gone, or not a segment: the reader sets it aside and reports it
    try:
        size = os.fstat(fd).st_size
        if offset > size:
            return f"the offset of {name} is {offset}, past the end of its {size} bytes"
        if boundaries(fd, offset) != offset:
            return f"the offset of {name} is {offset}, not at a record's end"
        return None
    finally:
        os.close(fd)
