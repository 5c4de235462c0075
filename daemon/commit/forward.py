"""The forward role: this host's spool sent to its shards' broker queues; offsets move once the broker has the entries.

A batch of spool records is decoded (a bad one is quarantined here, and the INTERNAL entry
about it travels like any other), grouped by shard, published, and confirmed by the broker;
only then does the ledger move past it. A crash between the two publishes the batch again:
the writer recognises the ids and writes each entry once. A broker that is down only makes
the spool grow; the service loop retries with backoff and `apilogd status` says why.
"""

from __future__ import annotations

from apilog.core.entry import Entry
from apilog.core.shards import shard_of
from apilog.settings import Settings

from ..exceptions import describe
from ..sources import open_publisher
from ..sources.spool import SpoolSource
from ..state.folders import Folders
from ..state.ledger import Ledger
from ..state.probe import Probe
from .batch import MAX_ITEMS, BatchWriter
from .budget import DropNotes


class Forwarder:
    """Publishes the spool's records to the broker: what BatchWriter is to files, for the forward role."""

    def __init__(self, settings: Settings, folders: Folders) -> None:
        self.settings = settings
        self.folders = folders
        BatchWriter(settings, folders, seal=False).close()  # a journal left by the local role is redone first, never dropped
        self.ledger = Ledger(folders.state, durable=settings.fsync != "off")
        self.probe = Probe(folders.state)
        self.source = SpoolSource(settings, folders, self.ledger)
        self.notes: list[Entry] = []
        self.drop_notes = DropNotes(settings)  # this host's producers' drops, noted through the broker
        self._marks: dict[str, int] = {}
        self.quarantined = 0
        try:
            self.publisher = open_publisher(settings)
        except BaseException:
            self.close()
            raise
        self.last_error: str | None = None

    def step(self, *, only_notes: bool = False) -> int:
        """Forward one batch; return how many records it consumed."""
        source = self.source
        self.notes.extend(source.notes)
        source.notes.clear()
        if not self._marks:  # the notes made last time still wait in self.notes
            drop_notes, self._marks = self.drop_notes.due(force=only_notes)
            self.notes.extend(drop_notes)
        batch = [] if only_notes else source.take(MAX_ITEMS)
        if not batch and not self.notes:
            source.drop_consumed()
            return 0
        by_shard: dict[int, list[Entry]] = {}
        set_aside = 0
        for record in batch:
            try:
                entry = source.entry(record)
            except Exception as exc:  # noqa: BLE001 - anything a record makes the decoder do means it is bad
                entry = source.set_aside(record, describe(exc))
                set_aside += 1
            by_shard.setdefault(shard_of(entry.location, self.settings.shards), []).append(entry)
        for note in self.notes:  # this host's INTERNAL notes go where the system's entries go
            by_shard.setdefault(shard_of(note.location, self.settings.shards), []).append(note)
        try:
            self.publisher.publish(by_shard)
        except OSError as exc:
            self.last_error = describe(exc)
            source.rewind(batch)
            raise
        self.last_error = None
        self.notes.clear()
        # A crash before this publishes the notes again under the same ids: the writer keeps each once.
        self.drop_notes.mark(self._marks)
        self.drop_notes.drained(source.consumed(batch))
        self._marks = {}
        source.acknowledge(batch)
        self.ledger.advance(source.positions(batch))
        self.ledger.save()
        source.drop_consumed()
        self.quarantined += set_aside
        return len(batch)

    def checkpoint(self) -> None:
        self.ledger.save()

    def close(self) -> None:
        if hasattr(self, "publisher"):
            self.publisher.close()
        self.source.close()
        self.probe.close()
