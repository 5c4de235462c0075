"""What every broker source shares: the ids of committed entries, the shard-holding writer, quarantined messages.

A broker may deliver a message again (a crash after the commit but before the ack, a
visibility timeout): the ids of committed batches are kept, and a message seen again is
acked without being written twice.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections import deque
from typing import Any, Generic, Protocol, TypeVar

from apilog.core import fs, wire
from apilog.core.entry import Entry, internal
from apilog.core.folder import Folder
from apilog.settings import Settings, redacted

from ..exceptions import StateDamaged
from ..state.folders import Folders
from ..state.ledger import DAMAGED, REPAIR_HINT, Ledger, refuse_unrepaired

MAX_MESSAGES = 2048
GATHER_SECONDS = 0.05  # how long a batch waits to fill up
REMEMBERED_IDS = 200_000
DELIVERED_NAME = "delivered.ids"
WRITER_ID_NAME = "writer.id"
_ID = re.compile(rb"[\x21-\x7e]{1,64}")


class DeliveredIds:
    """Ids of the most recent committed entries, in memory and in an append-only file of the state folder.

    Appended without a sync: the journal holds the ids of every batch since the last
    checkpoint, and a checkpoint syncs this file before it empties the journal.
    """

    def __init__(self, state: Folder) -> None:
        self.state = state
        self._order: deque[str] = deque()
        self._set: set[str] = set()
        try:
            raw = state.read(DELIVERED_NAME)
        except FileNotFoundError:
            refuse_unrepaired(state, DELIVERED_NAME)
            raw = b""
        known, bad = parse_ids(raw)
        if bad:
            aside = state.set_aside(DELIVERED_NAME, DAMAGED)
            raise StateDamaged(f"{state.path / DELIVERED_NAME} is damaged ({bad}); moved to {state.path / aside}; "
                               f"nothing was written; {REPAIR_HINT}")
        self._lines = len(known)
        self._remember(known)
        self.fd = state.open(DELIVERED_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._set

    def add(self, ids: list[str]) -> None:
        fresh = [i for i in ids if i not in self._set]
        if not fresh:
            return
        fs.write(self.fd, "".join(f"{i}\n" for i in fresh).encode())
        self._lines += len(fresh)
        self._remember(fresh)
        if self._lines > 2 * REMEMBERED_IDS:  # keep the file about as short as the memory
            self.state.write_atomic(DELIVERED_NAME, "".join(f"{i}\n" for i in self._order).encode())
            os.close(self.fd)
            self.fd = self.state.open(DELIVERED_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            self._lines = len(self._order)

    def sync(self) -> None:
        fs.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def _remember(self, ids: list[str]) -> None:
        for entry_id in ids:
            self._order.append(entry_id)
            self._set.add(entry_id)
        while len(self._order) > REMEMBERED_IDS:
            self._set.discard(self._order.popleft())


def parse_ids(raw: bytes) -> tuple[list[str], str | None]:
    """The ids in a delivered-ids file, and what is wrong with it (None when nothing is)."""
    ids: list[str] = []
    bad = None
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line:
            continue
        if _ID.fullmatch(line):
            ids.append(line.decode("ascii"))
        elif bad is None:
            bad = f"line {n} is not an entry id"
    return ids, bad


class _HeldShard(Protocol):
    shard: int
    owned: bool


ShardT = TypeVar("ShardT", bound=_HeldShard)


class ShardWriter(Generic[ShardT]):
    """What a writer of broker shards keeps whatever the broker: its shards, the ids it journaled, its notes."""

    def __init__(self, settings: Settings, folders: Folders, ledger: Ledger) -> None:
        assert settings.broker_url is not None  # noqa: S101 - the write role requires it
        self.folders = folders
        self.durable = settings.fsync != "off"
        self.notes: list[Entry] = []
        self.name = f"shards {','.join(map(str, sorted(settings.writer_shards)))} of {redacted(settings.broker_url)}"
        self.wakeup: int | None = None  # take() itself waits on the broker
        self.standby = settings.standby
        self.shards: list[ShardT] = []
        self.delivered = DeliveredIds(folders.state)
        self.delivered.add(ledger.last_ids)  # journaled since the last checkpoint: perhaps not in the file yet

    def entry(self, item: Any) -> Entry:
        """The entry its message was decoded into when taken (a bad message: why, raised)."""
        if item.entry is None:
            raise wire.BadMessage(item.problem)
        return item.entry  # type: ignore[no-any-return]

    def positions(self, batch: list[Any]) -> dict[str, int]:
        return {}  # a broker forgets what it delivered once acked: the ids tell a redelivery

    def drop_consumed(self) -> None:
        """Acknowledged messages are the broker's to forget."""

    def persist_acks(self) -> None:
        self.delivered.sync()

    def consumed(self, batch: list[Any]) -> int:
        return 0  # the broker's messages take no room in this host's spool

    def waiting_bytes(self) -> int | None:
        return None  # `apilogd status` asks the broker for its backlog

    def owned(self) -> list[int]:
        return [s.shard for s in self.shards if s.owned]


def quarantine_message(folders: Folders, body: bytes, why: str, durable: bool) -> Entry:
    """Keep a bad broker message in quarantine; return the INTERNAL entry that reports it."""
    name = f"broker.{uuid.uuid4().hex}.msg"
    folders.quarantine.write_atomic(name, body, durable=durable)
    return internal(f"quarantined broker message: {why}",
                    {"bytes": len(body), "reason": why, "moved_to": str(folders.quarantine.path / name)})


def writer_id(state: Folder) -> str:
    """This APILOG_HOME's name among the writers of a broker, made once: a restarted writer keeps its leases."""
    try:
        return state.read(WRITER_ID_NAME, 256).decode("ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        name = f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}"
        state.write_atomic(WRITER_ID_NAME, name.encode())
        return name


def body_bytes(message: Any) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogateescape")
