"""The embedded spool as a source: records read in each producer's order, committed as ledger offsets."""

from __future__ import annotations

import hashlib
import os
import re

from apilog.core import wire
from apilog.core.entry import Entry, internal
from apilog.core.folder import Folder
from apilog.settings import Settings
from apilog.spool.frame import boundaries

from ..state.folders import SEGMENTS_SHARE, Folders, descriptor_share
from ..state.ledger import Ledger
from .appends import Appends
from .spool_reader import Record, SpoolReader, offset_problem

MAX_BYTES = 32 * 1024 * 1024  # of records per batch (with MAX_ITEMS): fewer batches, fewer writes per file
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


def quarantine_name(source: str) -> str:
    """A file name for quarantined bytes that no spool file name can stretch past 255 bytes or out of the folder."""
    if _PLAIN_NAME.fullmatch(source) and not source.startswith("."):
        return source
    return "h" + hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def keep_aside(quarantine: Folder, name: str, data: bytes, durable: bool) -> str:
    """Store `data` in quarantine under `name`, or `name-N`: never over other bytes (a name may come round again)."""
    for n in range(1000):
        candidate = name if n == 0 else f"{name}-{n}"
        try:
            if quarantine.read(candidate, len(data) + 1) == data:
                return candidate  # the same bytes, set aside by an attempt of this batch that failed later
        except FileNotFoundError:
            quarantine.write_atomic(candidate, data, durable=durable)
            return candidate
    raise FileExistsError(f"{quarantine.path / name}: a thousand different files under this name")


def set_aside_range(folders: Folders, name: str, fd: int, start: int, durable: bool,
                    why: str) -> tuple[int, dict[str, object] | None]:
    """Copy the whole records of segment `name` from `start` on into quarantine; return the new offset and what moved.

    For records whose fate is unknown (written already or not): neither written again nor dropped.
    """
    end = max(start, boundaries(fd, os.fstat(fd).st_size))
    if end == start:
        return end, None
    target = f"{why}.{quarantine_name(name)}.{os.fstat(fd).st_ino}.{start}-{end}.seg"
    target = keep_aside(folders.quarantine, target, os.pread(fd, end - start, start), durable)
    return end, {"segment": name, "from": start, "to": end, "moved_to": str(folders.quarantine.path / target)}


class SpoolSource:
    """The spool's records, in each producer's order; its positions are the ledger's committed offsets."""

    def __init__(self, settings: Settings, folders: Folders, ledger: Ledger) -> None:
        self.folders = folders
        self.ledger = ledger
        self.durable = settings.fsync != "off"
        self.notes: list[Entry] = []
        self._removed = False  # segments removed since the last checkpoint
        self._check_offsets()
        self.reader = SpoolReader(folders.segments, self.ledger.offsets, max_open=descriptor_share(SEGMENTS_SHARE))
        self.name = str(settings.spool_dir)
        # Appends wake their segment: thousands of live producers cost nothing while they are quiet.
        self.appends = Appends(folders.segments.path)
        self.reader.watched = self.appends.watching
        self.wakeup = self.appends.fileno()

    def _check_offsets(self) -> None:
        """A committed offset must end a whole record inside its segment; where it does not, the segment is set aside.

        Its owner may have cut or rewritten it (a producer owns its file), or a power cut took
        its unsynced tail: which of its records were written is unknown, so they are kept in
        quarantine rather than written again, and the rest of the spool flows.
        """
        segments = self.folders.segments
        for name, offset in list(self.ledger.offsets.items()):
            if not segments.exists(name):
                self.ledger.forget(name)  # removed once drained, before the ledger was saved again
                continue
            problem = offset_problem(segments, name, offset)
            if problem is None:
                continue
            fd = segments.open_regular(name)
            try:
                self.ledger.offsets[name], moved = set_aside_range(self.folders, name, fd, 0, self.durable, "doubtful")
            finally:
                os.close(fd)
            self.notes.append(internal("set aside a segment whose committed offset no longer fits it",
                                       {"problem": problem, "set_aside": moved,
                                        "what_happens": "its records are in quarantine, not written again"}))
        self.ledger.save()

    def close(self) -> None:
        self.appends.close()
        self.reader.close()

    def persist_acks(self) -> None:
        """Make the removal of drained segments durable before the ledger that forgets them is saved.

        Else a power cut could bring a segment back that the ledger no longer names: read again from
        its start, written twice. The log files' syncfs does not reach a spool on another file system.
        """
        if self._removed:
            self.folders.segments.fsync()
            self._removed = False

    def clean_up(self) -> None:
        """Tidy the spool's `tmp/`, quarantining anything with bytes in it."""
        for name, raw, size in self.reader.sweep_tmp(self.folders.tmp):
            target = keep_aside(self.folders.quarantine, f"tmp.{quarantine_name(name)}", raw, self.durable)
            self.notes.append(internal("quarantined a file left in the spool's tmp folder",
                                       {"name": name, "moved_to": str(self.folders.quarantine.path / target),
                                        "bytes": size, "bytes_kept": len(raw)}))

    def look_for_input(self) -> None:
        self.reader.scan()
        self.reader.touched(self.appends.take())  # None: inotify lost events, every segment is looked at
        for name, why in self.reader.fresh_rejections:
            self.notes.append(internal(f"set aside a spool entry that is not a segment: {why}",
                                       {"name": name, "folder": str(self.folders.segments.path), "reason": why,
                                        "what_happens": "never read; reported once; remove it by hand"}))
        self.reader.fresh_rejections.clear()

    def take(self, limit: int) -> list[Record]:
        return self.reader.read(limit, MAX_BYTES)

    def key(self, record: Record) -> str:
        return f"{record.segment}@{record.start}"

    def positions(self, batch: list[Record]) -> dict[str, int]:
        return {record.segment: record.end for record in batch}  # records come in order per segment

    def ids(self, batch: list[Record]) -> list[str]:
        return []  # a record is read once: its offset says whether it was written

    def consumed(self, batch: list[Record]) -> int:
        """The spool bytes the batch's records took."""
        return sum(record.end - record.start for record in batch)

    def acknowledge(self, batch: list[Record]) -> None:
        self.reader.commit(self.positions(batch))

    def rewind(self, batch: list[Record]) -> None:
        self.reader.rewind(self.ledger.offsets)

    def drop_consumed(self) -> None:
        """Remove segments that are sealed and written to their end."""
        for name in self.reader.drained():
            self.reader.remove(name)
            self.ledger.forget(name)
            self._removed = True
        while self.reader.vanished:
            self.ledger.forget(self.reader.vanished.pop())

    def waiting_bytes(self) -> int:
        return self.reader.waiting_bytes()

    def entry(self, record: Record) -> Entry:
        if record.damaged is not None:
            raise ValueError(record.damaged)
        return wire.decode(record.payload)

    def set_aside(self, record: Record, why: str) -> Entry:
        # The inode too: a name reused by someone else must never overwrite what was set aside before.
        name = keep_aside(self.folders.quarantine,
                          f"{quarantine_name(record.segment)}.{self.reader.inode(record.segment)}.{record.start}.msg",
                          record.payload, self.durable)
        return internal(f"quarantined spool message: {why}",
                        {"segment": record.segment, "offset": record.start, "bytes": len(record.payload),
                         "reason": why, "moved_to": str(self.folders.quarantine.path / name)})

