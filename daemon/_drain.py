"""The embedded spool as a source: records read in each producer's order, committed as ledger offsets."""

from __future__ import annotations

import hashlib
import re

from apilog import _message
from apilog._entry import Entry, internal
from apilog.settings import Settings
from apilog.spool.reader import Record, SpoolReader, offset_problem

from ._batch import BatchWriter
from ._folders import Folders

MAX_BYTES = 16 * 1024 * 1024
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


def quarantine_name(source: str, offset: int | None = None) -> str:
    """A file name for quarantined bytes that no spool file name can stretch past 255 bytes or out of the folder."""
    safe = source if _PLAIN_NAME.fullmatch(source) and not source.startswith(".") else \
        "h" + hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return safe if offset is None else f"{safe}.{offset}.msg"


class Drainer(BatchWriter):
    """Moves records from the spool into their files, exactly once."""

    def __init__(self, settings: Settings, folders: Folders) -> None:
        super().__init__(settings, folders)
        self.reader = SpoolReader(folders.segments, self.ledger.offsets)
        self.source = str(settings.spool_dir)
        self._check_offsets()

    def _check_offsets(self) -> None:
        """Committed offsets must end whole records inside their segments, or the ledger cannot be trusted."""
        for name, offset in list(self.ledger.offsets.items()):
            if not self.folders.segments.exists(name):
                self.ledger.forget(name)  # removed once drained, before the ledger was saved again
            elif (problem := offset_problem(self.folders.segments, name, offset)) is not None:
                self.ledger.damaged(problem)

    def close(self) -> None:
        self.reader.close()
        super().close()

    def sweep(self) -> None:
        """Tidy the spool's `tmp/`, quarantining anything with bytes in it."""
        for name, raw, size in self.reader.sweep_tmp(self.folders.tmp):
            target = f"tmp.{quarantine_name(name)}"
            self.folders.quarantine.write_atomic(target, raw, durable=self.durable)
            self.notes.append(internal("quarantined a file left in the spool's tmp folder",
                                       {"name": name, "moved_to": str(self.folders.quarantine.path / target),
                                        "bytes": size, "bytes_kept": len(raw)}))

    def scan(self) -> None:
        self.reader.scan()
        for name, why in self.reader.fresh_rejections:
            self.notes.append(internal(f"set aside a spool entry that is not a segment: {why}",
                                       {"name": name, "folder": str(self.folders.segments.path), "reason": why,
                                        "what_happens": "never read; reported once; remove it by hand"}))
        self.reader.fresh_rejections.clear()

    def take(self, limit: int) -> list[Record]:
        return self.reader.read(limit, MAX_BYTES)

    def key(self, record: Record) -> str:
        return f"{record.segment}@{record.start}"

    def consumed(self, batch: list[Record]) -> dict[str, int]:
        return {record.segment: record.end for record in batch}  # records come in order per segment

    def committed(self, batch: list[Record], consumed: dict[str, int]) -> None:
        self.reader.commit(consumed)
        self.idle()

    def rewind(self, batch: list[Record] | None = None) -> None:
        self.reader.rewind(self.ledger.offsets)

    def idle(self) -> None:
        """Remove segments that are sealed and written to their end."""
        for name in self.reader.drained():
            self.reader.remove(name)
            self.ledger.forget(name)

    def waiting_bytes(self) -> int:
        return self.reader.waiting_bytes()

    def entry(self, record: Record) -> Entry:
        if record.damaged is not None:
            raise ValueError(record.damaged)
        return Entry.from_wire(_message.decode(record.payload))

    def set_aside(self, record: Record, why: str) -> Entry:
        name = quarantine_name(record.segment, record.start)
        self.folders.quarantine.write_atomic(name, record.payload, durable=self.durable)
        return internal(f"quarantined spool message: {why}",
                        {"segment": record.segment, "offset": record.start, "bytes": len(record.payload),
                         "reason": why, "moved_to": str(self.folders.quarantine.path / name)})

