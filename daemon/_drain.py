"""The embedded spool as a source: records read in each producer's order, committed as ledger offsets."""

from __future__ import annotations

from apilog import _message, spool
from apilog._entry import Entry, internal
from apilog.settings import Settings
from apilog.spool.reader import Record, SpoolReader

from ._batch import BatchWriter

MAX_RECORDS = 16384
MAX_BYTES = 16 * 1024 * 1024


class Drainer(BatchWriter):
    """Moves records from the spool into their files, exactly once."""

    def __init__(self, settings: Settings) -> None:
        spool.ensure(settings.spool_dir)
        super().__init__(settings)
        self.reader = SpoolReader(settings.spool_dir, self.ledger.offsets)
        self.source = str(settings.spool_dir)

    def close(self) -> None:
        self.reader.close()
        super().close()

    def sweep(self) -> None:
        """Tidy the spool's `tmp/`, reporting anything that had to be quarantined."""
        for path in self.reader.sweep_tmp():
            self.notes.append(internal("quarantined a file left in the spool's tmp folder",
                                       {"moved_to": str(path), "bytes": path.stat().st_size}))

    def scan(self) -> None:
        self.reader.scan()

    def take(self) -> list[Record]:
        return self.reader.read(MAX_RECORDS, MAX_BYTES)

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
        if record.damaged is None:
            try:
                return Entry.from_wire(_message.decode(record.payload))
            except ValueError as exc:  # BadMessage included
                why = str(exc)
        else:
            why = record.damaged
        path = self.reader.dirs["quarantine"] / f"{record.segment}.{record.start}.msg"
        return self.quarantine(path, record.payload, "spool message", why,
                               segment=record.segment, offset=record.start)
