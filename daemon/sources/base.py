"""What the batch writer drains: the small protocol a source (the spool, a broker) implements."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from apilog.core.entry import Entry

ItemT = TypeVar("ItemT")


class Source(Protocol[ItemT]):
    """Hands out items in batches, says what entry each carries, and is told when a batch is committed.

    One verb per job: `take` a batch, `acknowledge` it once journaled (or `rewind` it),
    `drop_consumed` input once in the files, `persist_acks` before a checkpoint empties the
    journal; `look_for_input` often, `clean_up` now and then.
    """

    name: str  # what is drained, said at start-up
    notes: list[Entry]  # INTERNAL entries about the source, written with the next batch
    wakeup: int | None  # a descriptor that turns readable when input arrives (ends an idle wait)

    def take(self, limit: int) -> list[ItemT]:
        """The next batch of at most `limit` raw items (empty when there is nothing to do)."""

    def key(self, item: ItemT) -> str:
        """A name for the item that stays the same when it is handed out again (for the crash probe)."""

    def entry(self, item: ItemT) -> Entry:
        """The entry an item carries; any exception means the item is bad."""

    def set_aside(self, item: ItemT, why: str) -> Entry:
        """Quarantine a bad item; return the INTERNAL entry that reports it."""

    def positions(self, batch: list[ItemT]) -> dict[str, int]:
        """Where the source stands once the batch is committed (kept in the journal, then the ledger)."""

    def ids(self, batch: list[ItemT]) -> list[str]:
        """Ids the journal keeps with the batch, for a source that may deliver an item twice."""

    def consumed(self, batch: list[ItemT]) -> int:
        """The bytes of local spool a batch took (0 for a broker): producers' spool budget grows by them at once."""

    def acknowledge(self, batch: list[ItemT]) -> None:
        """The batch is in the journal: acknowledge it at the source."""

    def rewind(self, batch: list[ItemT]) -> None:
        """A batch was not committed: hand it out again."""

    def drop_consumed(self) -> None:
        """Every committed item is in its files (and in the journal until a checkpoint): drop what is consumed."""

    def look_for_input(self) -> None:
        """Look for new input (cheap; called often while idle)."""

    def clean_up(self) -> None:
        """Tidy the source's leftovers (called at start and once a minute)."""

    def persist_acks(self) -> None:
        """Make the source's own record of what it acknowledged durable (before the journal is emptied)."""

    def waiting_bytes(self) -> int | None:
        """How much waits at the source, when the source can tell."""

    def close(self) -> None:
        """Release the source (unacknowledged items stay there)."""


class Publisher(Protocol):
    """Puts entries into the broker's shard queues."""

    name: str

    def publish(self, by_shard: dict[int, list[Entry]]) -> None:
        """Return once the broker holds every entry (confirmed); raise OSError otherwise."""

    def durability_warning(self) -> str | None:
        """Why the broker could lose what it confirmed, or None."""

    def close(self) -> None: ...


class NoSource:
    """A source with nothing in it: for replaying the journal without draining (`apilog archive` offline)."""

    name = "nothing"
    wakeup: int | None = None

    def __init__(self) -> None:
        self.notes: list[Entry] = []

    def take(self, limit: int) -> list[Any]:
        return []

    # take() hands out nothing, so nothing is ever asked about an item.
    def key(self, item: Any) -> str:
        raise LookupError(item)

    def entry(self, item: Any) -> Entry:
        raise LookupError(item)

    def set_aside(self, item: Any, why: str) -> Entry:
        raise LookupError(item)

    def positions(self, batch: list[Any]) -> dict[str, int]:
        return {}

    def ids(self, batch: list[Any]) -> list[str]:
        return []

    def consumed(self, batch: list[Any]) -> int:
        return 0

    def acknowledge(self, batch: list[Any]) -> None: ...
    def rewind(self, batch: list[Any]) -> None: ...
    def drop_consumed(self) -> None: ...
    def look_for_input(self) -> None: ...
    def clean_up(self) -> None: ...
    def persist_acks(self) -> None: ...
    def close(self) -> None: ...

    def waiting_bytes(self) -> int | None:
        return None
