"""Any Celery broker as a source: messages consumed with manual acks, acked after their batch is committed.

A broker may deliver a message again (a crash after the commit but before the ack, a
visibility timeout): the ids of committed batches are kept, and a message seen again is
acked without being written twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import time
import uuid
from collections import deque
from typing import Any, Generic, Protocol, TypeVar

from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import KombuError
from kombu.message import Message

from apilog.core import wire
from apilog.core.entry import Entry, internal
from apilog.core.folder import Folder
from apilog.core.shards import queue_name
from apilog.settings import Settings, redacted

from ..commit.batch import describe, say
from ..exceptions import BrokerUnavailable, StateDamaged
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
        os.write(self.fd, "".join(f"{i}\n" for i in fresh).encode())
        self._lines += len(fresh)
        self._remember(fresh)
        if self._lines > 2 * REMEMBERED_IDS:  # keep the file about as short as the memory
            self.state.write_atomic(DELIVERED_NAME, "".join(f"{i}\n" for i in self._order).encode())
            os.close(self.fd)
            self.fd = self.state.open(DELIVERED_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            self._lines = len(self._order)

    def sync(self) -> None:
        os.fdatasync(self.fd)

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


class BrokerSource:
    """Apilog task messages of a Celery broker (APILOG_BROKER_URL), acked once their batch is journaled."""

    def __init__(self, settings: Settings, folders: Folders, ledger: Ledger) -> None:
        assert settings.broker_url is not None  # noqa: S101 - open_source() chose this source for it
        self.settings = settings
        self.folders = folders
        self.durable = settings.fsync != "off"
        self.notes: list[Entry] = []
        self.delivered = DeliveredIds(folders.state)
        self.delivered.add(ledger.last_ids)  # journaled since the last checkpoint: perhaps not in the file yet
        self.name = redacted(settings.broker_url)
        self.wakeup: int | None = None  # take() itself waits on the broker
        self.queues = [Queue(queue_name(k), Exchange(queue_name(k), type="direct"), routing_key=queue_name(k))
                       for k in sorted(settings.writer_shards)]
        self.inbox: list[Message] = []
        self.retry: list[Message] = []  # a batch that failed to be written, tried again as it was
        self.connection: Connection | None = None
        self.reconnect_after_batch = False
        try:
            self._connect()
        except OSError as exc:
            self.delivered.close()
            raise BrokerUnavailable(str(exc)) from None

    def _connect(self) -> None:
        try:
            self.connection = Connection(self.settings.broker_url)
        except Exception as exc:  # kombu fails in many ways when a transport's client library is missing
            raise OSError(f"cannot use the broker {self.name} ({exc!r}); is its client library installed?") from exc
        try:
            self.connection.ensure_connection(max_retries=1)
        except (*self.connection.connection_errors, KombuError, OSError) as exc:
            self.connection = None
            raise OSError(f"cannot reach the broker {self.name}: {exc}") from exc
        self.consumer = Consumer(self.connection.channel(), queues=self.queues, on_message=self.inbox.append,
                                 no_ack=False, prefetch_count=MAX_MESSAGES)
        self.consumer.consume()

    def close(self) -> None:
        self._drop_connection()  # unacked messages go back to the broker
        self.delivered.close()

    def sync(self) -> None:
        self.delivered.sync()

    def tidy(self) -> None:
        """Acked messages are the broker's to forget: nothing to tidy here."""

    def scan(self) -> None:
        """The broker pushes messages to the consumer: nothing to look for."""

    def sweep(self) -> None:
        """The broker keeps its own queue tidy."""

    def consumed(self, batch: list[Any]) -> int:
        return 0  # the broker's messages take no room in this host's spool

    def waiting_bytes(self) -> int | None:
        return None  # the broker's own tools tell its backlog

    def positions(self, batch: list[Message]) -> dict[str, int]:
        return {}  # a broker forgets what it delivered once acked: the ids tell a redelivery

    def take(self, limit: int) -> list[Message]:
        if self.retry:
            batch, self.retry = self.retry[:limit], self.retry[limit:]
            return batch
        if self.connection is None:
            self._connect()
        connection = self.connection
        assert connection is not None  # noqa: S101 - _connect() sets it or raises
        deadline = time.monotonic() + GATHER_SECONDS
        try:
            while len(self.inbox) < limit and (left := deadline - time.monotonic()) > 0:
                connection.drain_events(timeout=left)
        except TimeoutError:
            pass
        except Exception as exc:  # kombu and its clients fail in many ways: all of them mean "reconnect"
            if not self.inbox:
                self._drop_connection()
                raise OSError(f"broker connection lost: {describe(exc)}") from exc
            # Messages already in hand are written first: a virtual transport (SQL, filesystem) restores
            # unacked messages itself on close, and loses them when the broker fails during that restore.
            say(f"broker connection lost after {len(self.inbox)} messages arrived; writing them, then reconnecting: "
                f"{describe(exc)}")
            self.reconnect_after_batch = True
        batch, self.inbox[:] = list(self.inbox), []
        fresh = []
        for message in batch:
            if message.headers.get("id") in self.delivered:
                self._ack(message)  # written before; its ack was lost
            else:
                fresh.append(message)
        self.retry = fresh[limit:]
        return fresh[:limit]

    def _drop_connection(self) -> None:
        """Forget the connection; every unacked message is delivered again (and recognised by its id)."""
        self.reconnect_after_batch = False
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.release()
        self.connection, self.inbox[:], self.retry = None, [], []

    def _ack(self, message: Message) -> None:
        try:
            message.ack()
        except Exception as exc:  # noqa: BLE001 - the entry is committed and its id kept: a redelivery is skipped
            say(f"broker ack failed, reconnecting: {describe(exc)}")
            self._drop_connection()

    def key(self, message: Message) -> str:
        task_id = message.headers.get("id") if isinstance(message.headers, dict) else None
        return f"broker:{task_id}:{hashlib.sha256(body_bytes(message)).hexdigest()[:16]}"

    def entry(self, message: Message) -> Entry:
        return wire.decode_body(message.body, message.content_type, message.headers)

    def set_aside(self, message: Message, why: str) -> Entry:
        return quarantine_message(self.folders, body_bytes(message), why, self.durable)

    def ids(self, batch: list[Message]) -> list[str]:
        return [str(m.headers.get("id")) for m in batch if isinstance(m.headers, dict) and m.headers.get("id")]

    def committed(self, batch: list[Message]) -> None:
        self.delivered.add(self.ids(batch))
        for message in batch:
            if self.connection is None:
                break  # dropped by a failed ack: the rest come back and are skipped by id
            self._ack(message)
        if self.reconnect_after_batch:
            self._drop_connection()

    def rewind(self, batch: list[Message]) -> None:
        if batch:
            self.retry = batch + self.retry  # still unacked: written again, as it was, on the next step


class KombuPublisher:
    """A forwarder's batches through kombu, for the brokers apilog has no native client for (SQL, and others)."""

    def __init__(self, settings: Settings) -> None:
        assert settings.broker_url is not None  # noqa: S101 - the forward role requires it
        self.url = settings.broker_url
        self.name = redacted(self.url)
        self.connection: Connection | None = None
        self.declared: set[int] = set()

    def publish(self, by_shard: dict[int, list[Entry]]) -> None:
        try:
            if self.connection is None:
                self.connection = Connection(self.url)
                self.connection.ensure_connection(max_retries=1)
                self.declared = set()
            producer = Producer(self.connection.default_channel)
            for shard, entries in by_shard.items():
                name = queue_name(shard)
                queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
                declare = [] if shard in self.declared else [queue]
                self.declared.add(shard)
                for entry in entries:
                    producer.publish(wire.task_body(entry), routing_key=name, exchange=queue.exchange, declare=declare,
                                     headers=wire.task_headers(entry.id), content_type=wire.CONTENT_TYPE,
                                     content_encoding="utf-8", delivery_mode=2, correlation_id=entry.id)
                    declare = []
        except Exception as exc:  # kombu and its clients fail in many ways: all of them mean "not published"
            self.close()
            raise OSError(f"broker: {describe(exc)}") from exc

    def durability_warning(self) -> str | None:
        return None

    def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.release()
        self.connection = None


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

    def tidy(self) -> None:
        """Acknowledged messages are the broker's to forget."""

    def sync(self) -> None:
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
