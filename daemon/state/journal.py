"""The daemon's write-ahead journal: each batch's bytes, appended and made durable with one fdatasync.

A batch is committed once its record is in the journal: the log files are then appended
without a sync, and a crash at any point after is repaired by redoing the records since the
last checkpoint (each file cut back to its size before the batch, the batch's bytes written
again). A checkpoint syncs the log files, saves the ledger with the last record it covers,
and empties the journal. A record torn by a crash while it was being appended was never
committed: no file was touched for it, and it is cut off.

Record: magic, header length, data length, CRC-32 of header and data; the header (JSON)
names each target file with its size before the batch and its share of the data, the
offsets the batch moves its sources to, and the ids it commits.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Iterator
from typing import NoReturn

import msgspec

from apilog.core import fs
from apilog.core.folder import Folder, UnsafePath

from ..exceptions import StateDamaged
from .ledger import (
    DAMAGED,
    LIVED_NAME,
    REPAIR_HINT,
    is_entry_id,
    is_relpath,
    is_segment_name,
    refuse_unrepaired,
)

JOURNAL_NAME = "journal"
MAGIC = b"APJ1"
HEADER = struct.Struct("<4sIII")  # magic, header length, data length, crc32(header + data)
MAX_RECORD = 1 << 30


class Batch(msgspec.Struct, frozen=True, omit_defaults=True):
    """One committed batch: what its record's header says."""

    seq: int
    files: list[tuple[str, int, int]]  # (relative path, size before the batch, bytes appended)
    advance: dict[str, int]  # source position -> offset once the batch is in
    ids: list[str]  # entry ids a broker source must not write again
    renames: list[tuple[str, str]] = []  # (live file, archive): rotations, done after the appends
    # (plain archive, size of its .gz): compressions, each switched from its .gz.tmp in two renames (BatchWriter._switch)
    switches: list[tuple[str, int]] = []
    removes: list[str] = []  # archives removed: a .gz by retention (a plain one, in a record of an older apilogd)
    noted: dict[str, int] = {}  # drop counters ("slot:key") whose counts the batch's suppression notes hold

    def shares(self, data: bytes) -> Iterator[tuple[str, int, bytes]]:
        """(relative path, size before, bytes) for each file of the batch."""
        at = 0
        for relpath, before, length in self.files:
            yield relpath, before, data[at:at + length]
            at += length


_decode = msgspec.json.Decoder(Batch).decode
_encode = msgspec.json.Encoder().encode


def _encode_batch(batch: Batch) -> bytes:
    try:
        return _encode(batch)
    except UnicodeEncodeError:  # a segment named in bytes that are not UTF-8: escaped as the stdlib does
        return json.dumps(msgspec.to_builtins(batch), separators=(",", ":")).encode()


def _decode_batch(head: memoryview) -> Batch:
    try:
        return _decode(head)
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError:  # perhaps such an escape, which msgspec refuses
        try:
            return msgspec.convert(json.loads(bytes(head)), Batch)
        except (ValueError, RecursionError):
            raise msgspec.DecodeError("not JSON") from None


_NOTED = re.compile(r"\d{1,5}:\d{1,20}")


def _problem(batch: Batch, data_len: int) -> str | None:
    """What is wrong with a record whose checksum holds (a hand edit, a bug): None when it is sound."""
    if batch.seq < 1:
        return f"record number {batch.seq}"
    for relpath, before, length in batch.files:
        if not is_relpath(relpath) or before < 0 or length < 0:
            return f"a file entry {relpath[:80]!r} that apilogd never writes"
    if sum(length for _, _, length in batch.files) != data_len:
        return "file shares that do not add up to its data"
    if any(not is_segment_name(name) or offset < 0 for name, offset in batch.advance.items()):
        return "a source position that is not one"
    if not all(is_entry_id(i) for i in batch.ids):
        return "an id that is not an entry id"
    if (not all(is_relpath(p) for pair in batch.renames for p in pair) or not all(map(is_relpath, batch.removes))
            or not all(is_relpath(p) and size >= 0 for p, size in batch.switches)):
        return "a rename or removal of a path apilogd never writes"
    if not all(_NOTED.fullmatch(k) and n >= 0 for k, n in batch.noted.items()):
        return "a drop counter that is not one"
    return None


def _record_at(raw: bytes, at: int) -> tuple[Batch, bytes, int] | str:
    """The record starting at `at`, its data and where the next begins; or why there is none."""
    if len(raw) - at < HEADER.size:
        return "a torn record header"
    magic, head_len, data_len, crc = HEADER.unpack_from(raw, at)
    start = at + HEADER.size
    end = start + head_len + data_len
    if magic != MAGIC or head_len + data_len > MAX_RECORD:
        return "not a journal record"
    if end > len(raw):
        return "a torn record"
    view = memoryview(raw)
    if zlib.crc32(view[start:end]) != crc:
        return "a record whose checksum does not match"
    batch = _header(view, start, head_len, data_len)
    return batch if isinstance(batch, str) else (batch, raw[start + head_len:end], end)


def _header(view: memoryview, start: int, head_len: int, data_len: int) -> Batch | str:
    """The batch a record's header at `start` describes, or what is wrong with it."""
    try:
        batch = _decode_batch(view[start:start + head_len])
    except msgspec.DecodeError as exc:
        return f"a record header that is not one ({exc})"
    problem = _problem(batch, data_len)
    return f"a record with {problem}" if problem else batch


def scan(raw: bytes) -> tuple[list[tuple[Batch, bytes]], int, str | None]:
    """Whole records from the start, where they end, and why what follows is not one (None at a clean end).

    The problem is None too for a torn tail (a crash while appending): only a bad record with a
    good one after it, or a record that reads but says nonsense, means the journal is damaged.
    """
    records: list[tuple[Batch, bytes]] = []
    at, last = 0, 0
    while at < len(raw):
        found = _record_at(raw, at)
        if isinstance(found, str):
            if found.startswith("a record with") or _a_record_after(raw, at + 1):
                return records, at, f"{found} at byte {at}"
            return records, at, None
        batch, data, end = found
        if last and batch.seq != last + 1:  # a record removed from the middle leaves a gap: its batch would be lost
            return records, at, f"record {batch.seq} after record {last} at byte {at}"
        last, at = batch.seq, end
        records.append((batch, data))
    return records, at, None


def torn_header(raw: bytes, at: int) -> Batch | None:
    """What the torn record at `at` says, when its header at least is whole and sound; None otherwise.

    Its checksum cannot be checked (its data is cut), so this is a witness, not a record: a crash
    tears a record before any of its files is touched, and a file grown past its size before the
    batch means the record had been whole, and was cut since.
    """
    if len(raw) - at < HEADER.size:
        return None
    magic, head_len, data_len, _ = HEADER.unpack_from(raw, at)
    start = at + HEADER.size
    if magic != MAGIC or start + head_len > len(raw):
        return None
    batch = _header(memoryview(raw), start, head_len, data_len)
    return None if isinstance(batch, str) else batch


def _a_record_after(raw: bytes, start: int) -> bool:
    at = raw.find(MAGIC, start)
    while at >= 0:
        if not isinstance(_record_at(raw, at), str):
            return True
        at = raw.find(MAGIC, at + 1)
    return False


class Journal:
    """The journal file of the state folder: records appended, replayed at start, emptied at each checkpoint."""

    def __init__(self, state: Folder, *, durable: bool, checkpoint: int | None) -> None:
        """`checkpoint`: the last record the ledger covers; None for a ledger older than the journal."""
        self.state = state
        self.path = state.path / JOURNAL_NAME
        self.durable = durable
        self.fd = -1
        if not state.exists(JOURNAL_NAME):
            refuse_unrepaired(state, JOURNAL_NAME)
            # The journal is made before the probe file and lives as long as the state folder:
            # missing after a daemon of this version ran here, it was lost, and its records with it.
            if checkpoint is not None and state.exists(LIVED_NAME):
                raise StateDamaged(f"{self.path} is missing, though apilogd ran here before; "
                                   f"nothing was written; {REPAIR_HINT}")
        checkpoint = checkpoint or 0
        try:
            self.fd = state.open_plain(JOURNAL_NAME, os.O_RDWR | os.O_APPEND, 0o640)
        except UnsafePath as exc:  # a folder, a link, a FIFO or a hard link in its place
            self.damaged(f"not a plain file: {exc.strerror or exc}")
        raw = state.read(JOURNAL_NAME, MAX_RECORD * 2)
        records, end, problem = scan(raw)
        if problem is not None:
            self.damaged(problem)
        # Torn by a crash while it was appended: never committed, no file touched. Cut off now, or,
        # when its header can still be read, by `cut_torn` once the writer has seen its files untouched.
        self.torn = torn_header(raw, end) if end < len(raw) else None
        if end < len(raw) and self.torn is None:
            fs.ftruncate(self.fd, end)
        self.size = end
        self.last_size = 0
        self.seq = max([checkpoint] + [batch.seq for batch, _ in records])
        self.to_redo = [(batch, data) for batch, data in records if batch.seq > checkpoint]

    def cut_torn(self) -> None:
        """The torn last record's files hold none of its bytes: it was never committed; cut it off."""
        if self.torn is not None:
            fs.ftruncate(self.fd, self.size)
            self.torn = None

    def damaged(self, why: str) -> NoReturn:
        """Set the journal aside and refuse to go on: one line naming it and the way out."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        aside = self.state.set_aside(JOURNAL_NAME, DAMAGED)
        raise StateDamaged(f"{self.path} is damaged ({why}); moved to {self.state.path / aside}; "
                           f"nothing was written; {REPAIR_HINT}")

    def append(self, files: list[tuple[str, int, int]], data: bytes, advance: dict[str, int],
               ids: list[str], *, renames: list[tuple[str, str]] | None = None,
               switches: list[tuple[str, int]] | None = None, removes: list[str] | None = None,
               noted: dict[str, int] | None = None) -> Batch:
        """Commit a batch: its record appended and, when durable, on disk before this returns."""
        batch = Batch(self.seq + 1, files, advance, ids, renames or [], switches or [], removes or [], noted or {})
        head = _encode_batch(batch)
        record = HEADER.pack(MAGIC, len(head), len(data), zlib.crc32(data, zlib.crc32(head))) + head + data
        view = memoryview(record)
        try:
            while view:
                view = view[fs.write(self.fd, view):]
            if self.durable:
                fs.fdatasync(self.fd)
        except BaseException:
            fs.ftruncate(self.fd, self.size)  # a half-written record must not precede the next one
            raise
        self.seq = batch.seq
        self.size += len(record)
        self.last_size = len(record)
        return batch

    def drop_last(self) -> None:
        """Take back the record appended last, none of whose effects happened (a rotation that failed)."""
        fs.ftruncate(self.fd, self.size - self.last_size)
        self.size -= self.last_size
        self.seq -= 1
        self.last_size = 0

    def empty(self) -> None:
        """Every record is covered by a saved checkpoint: start the journal afresh."""
        fs.ftruncate(self.fd, 0)
        self.size = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
