"""The consumer side of the spool: records read in order from each producer's segments."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import layout
from ._frame import HEADER, MAGIC, MAX_PAYLOAD

CHUNK = 1024 * 1024
MAX_DAMAGED = 1024 * 1024  # garbage is quarantined in pieces of at most this size
STALE_TMP_SECONDS = 60


@dataclass(slots=True)
class Record:
    """One framed message, or a damaged stretch of a segment (`damaged` says why)."""

    segment: str
    start: int
    end: int
    payload: bytes
    damaged: str | None = None


class _Segment:
    """An open segment file and how far it has been read."""

    def __init__(self, name: str, fd: int, pos: int) -> None:
        self.name = name
        self.fd = fd
        self.pos = pos
        self.sealed = False
        self.producer, self.seq = _split_name(name)

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


class SpoolReader:
    """Reads records from every producer's segments, in each producer's order."""

    def __init__(self, spool_dir: Path, committed: Mapping[str, int]) -> None:
        self.dirs = layout(spool_dir)
        self._segments: dict[str, _Segment] = {}
        self._committed = dict(committed)
        self._start = 0  # rotates which producer a batch starts with, for fairness

    def close(self) -> None:
        for seg in self._segments.values():
            os.close(seg.fd)
        self._segments.clear()

    def scan(self) -> None:
        """Pick up segments that appeared since the last scan."""
        try:
            names = os.listdir(self.dirs["segments"])
        except FileNotFoundError:
            return
        for name in names:
            if name in self._segments or name.startswith("."):
                continue
            try:
                fd = os.open(self.dirs["segments"] / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
                    continue  # gone already, or a link or socket: not ours to read
                raise
            self._segments[name] = _Segment(name, fd, self._committed.get(name, 0))

    def _by_producer(self) -> list[list[_Segment]]:
        groups: dict[str, list[_Segment]] = {}
        for seg in self._segments.values():
            groups.setdefault(seg.producer, []).append(seg)
        ordered = [sorted(g, key=lambda s: s.seq) for _, g in sorted(groups.items())]
        if ordered:
            self._start = (self._start + 1) % len(ordered)
            ordered = ordered[self._start:] + ordered[: self._start]
        return ordered

    def read(self, max_records: int, max_bytes: int) -> list[Record]:
        """Up to the limits, the next records of every producer; a producer's next segment waits for the one before."""
        out: list[Record] = []
        size = 0
        for group in self._by_producer():
            for seg in group:
                for record in self._records(seg):
                    out.append(record)
                    size += record.end - record.start
                    if len(out) >= max_records or size >= max_bytes:
                        return out
                if not (seg.sealed and seg.pos >= os.fstat(seg.fd).st_size):
                    break  # this producer's later segments wait until this one is final and read
        return out

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
            nxt = buf.find(MAGIC, off + 1)
            stop = nxt if nxt > 0 else len(buf)
            return self._damaged(seg, buf[off:stop], "bytes that are not a framed record")
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
        raw = raw[:MAX_DAMAGED]
        return Record(seg.name, seg.pos, seg.pos + len(raw), raw, damaged=why)

    def rewind(self, committed: Mapping[str, int]) -> None:
        """Forget reads past the committed offsets (a batch failed and will be read again)."""
        self._committed = dict(committed)
        for seg in self._segments.values():
            seg.pos = self._committed.get(seg.name, 0)

    def commit(self, offsets: Mapping[str, int]) -> None:
        self._committed.update(offsets)

    def waiting_bytes(self) -> int:
        """Bytes in known segments past their committed offsets."""
        return sum(max(0, os.fstat(seg.fd).st_size - self._committed.get(seg.name, 0)) for seg in self._segments.values())

    def drained(self) -> list[str]:
        """Segments that are sealed and committed to their end: ready to be removed."""
        done = []
        for seg in self._segments.values():
            if seg.check_sealed() and self._committed.get(seg.name, 0) >= os.fstat(seg.fd).st_size:
                done.append(seg.name)
        return done

    def remove(self, name: str) -> None:
        """Delete a drained segment."""
        seg = self._segments.pop(name)
        os.close(seg.fd)
        self._committed.pop(name, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dirs["segments"] / name)

    def sweep_tmp(self) -> list[Path]:
        """Clear `tmp/` of segments a producer died creating; anything with content is quarantined, returned."""
        now = time.time()
        moved = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.dirs["tmp"]) as entries:
            for item in entries:
                with contextlib.suppress(OSError):
                    st = item.stat(follow_symlinks=False)
                    if now - st.st_mtime <= STALE_TMP_SECONDS:
                        continue  # a producer may be about to rename it into place
                    if st.st_size == 0 or not stat.S_ISREG(st.st_mode):
                        os.unlink(item.path)  # never renamed, so never written: nothing is lost
                    else:
                        target = self.dirs["quarantine"] / f"tmp.{item.name}"
                        os.rename(item.path, target)
                        moved.append(target)
        return moved


def waiting(spool_dir: Path, committed: Mapping[str, int]) -> tuple[int, list[bytes]]:
    """Records waiting past the committed offsets: their count, and each segment's first waiting payload."""
    count = 0
    firsts: list[bytes] = []
    segments = layout(spool_dir)["segments"]
    try:
        names = os.listdir(segments)
    except FileNotFoundError:
        return 0, []
    for name in names:
        try:
            fd = os.open(segments / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            found, first = _count_records(fd, committed.get(name, 0))
        finally:
            os.close(fd)
        count += found
        if first is not None:
            firsts.append(first)
    return count, firsts


def _count_records(fd: int, pos: int) -> tuple[int, bytes | None]:
    """Whole records from `pos` on, walking headers a chunk at a time; and the first one's payload."""
    size = os.fstat(fd).st_size
    count, first = 0, None
    buf, base = b"", pos
    while pos + HEADER.size <= size:
        if pos + HEADER.size > base + len(buf):
            buf, base = os.pread(fd, CHUNK, pos), pos
        magic, length, _ = HEADER.unpack_from(buf, pos - base)
        end = pos + HEADER.size + length
        if magic != MAGIC or length > MAX_PAYLOAD or end > size:
            break  # garbage, or a record still being written
        if first is None:
            first = os.pread(fd, length, pos + HEADER.size)
        count += 1
        pos = end
    return count, first
