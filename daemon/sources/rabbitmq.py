"""RabbitMQ between the hosts: quorum queues, publisher confirms pipelined per batch, one exclusive writer per shard.

A forwarder publishes a whole batch, up to 256 entries of one shard per task message
(RabbitMQ's cost and py-amqp's are per message, not per byte), then waits for the broker's
confirms: one round trip for the batch. A writer consumes its shards' queues with an
exclusive consumer and manual acks; a message is acked once its last entry is committed.
A writer of named shards takes one that has no consumer at once; a standby (all shards) polls
each shard's consumer count and takes it once it has had none for `TAKEOVER_AFTER` seconds:
long enough for a writer restarted by systemd to come back to its own shards, short enough
to be within 30 s of the owner's death or stop.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import amqp
from kombu import Connection

from apilog.core import wire
from apilog.core.entry import Entry
from apilog.core.shards import queue_name
from apilog.settings import Settings, redacted

from ..exceptions import say
from ..state.folders import Folders
from ..state.ledger import Ledger
from .broker import ShardWriter, body_bytes, quarantine_message

QUEUE_ARGUMENTS = {"x-queue-type": "quorum"}  # replicated and fsynced by RabbitMQ before it confirms
TAKEOVER_AFTER = 15.0  # seconds a shard has had no consumer before a standby takes it
POLL_EVERY = 1.0
GATHER_SECONDS = 0.05
CONFIRM_TIMEOUT = 30.0
PREFETCH = 64  # messages, each of up to ENTRIES_PER_MESSAGE entries
ENTRIES_PER_MESSAGE = 256


def _connect(url: str) -> tuple[Connection, Any]:
    """kombu parses every form of AMQP URL; the py-amqp connection under it does the work."""
    kombu_conn = Connection(url, connect_timeout=5, heartbeat=0)
    try:
        kombu_conn.connect()
    except Exception as exc:
        raise OSError(f"cannot reach RabbitMQ at {redacted(url)}: {exc}") from exc
    raw = kombu_conn.connection
    raw.sock.settimeout(CONFIRM_TIMEOUT)  # a broker that hangs is an error to retry, never a hang
    return kombu_conn, raw


def _let_go(conn: Connection | None, *, failed: bool) -> None:
    """Close a connection: politely when it works, at once when it failed (a dead broker never answers a close)."""
    if conn is None:
        return
    with contextlib.suppress(Exception):
        if failed:
            conn.collect()
        else:
            conn.connection.sock.settimeout(2)
            conn.release()


def declare(channel: Any, shard: int) -> None:
    channel.queue_declare(queue_name(shard), durable=True, auto_delete=False, arguments=QUEUE_ARGUMENTS)


def _message(entries: list[Entry]) -> amqp.Message:
    """Several entries of one shard in one task message: RabbitMQ's cost and py-amqp's are per message."""
    task_id = str(uuid.uuid4())
    return amqp.Message(wire.task_body_of_many(entries), content_type=wire.CONTENT_TYPE, content_encoding="utf-8",
                        application_headers=wire.task_headers(task_id), delivery_mode=2,
                        correlation_id=task_id, priority=0)


class AmqpPublisher:
    """A forwarder's batches into the shard queues, each batch confirmed as a whole."""

    def __init__(self, settings: Settings) -> None:
        assert settings.broker_url is not None  # noqa: S101 - the forward role requires it
        self.url = settings.broker_url
        self.name = redacted(self.url)
        self.conn: Connection | None = None
        self.channel: Any = None
        self.declared: set[int] = set()
        self.sent = 0  # delivery tags published on this channel
        self.confirmed = 0
        self.refused: str | None = None

    def _open(self) -> Any:
        if self.channel is None:
            self.conn, raw = _connect(self.url)
            channel = raw.channel()
            channel.confirm_select()
            channel.events["basic_ack"].add(self._acked)
            channel.events["basic_nack"].add(self._nacked)
            self.channel, self.sent, self.confirmed, self.declared = channel, 0, 0, set()
        return self.channel

    def _acked(self, delivery_tag: int, multiple: bool) -> None:
        self.confirmed = max(self.confirmed, delivery_tag)

    def _nacked(self, delivery_tag: int, multiple: bool) -> None:
        self.refused = f"RabbitMQ refused message {delivery_tag} (nack)"

    def publish(self, by_shard: dict[int, list[Entry]]) -> None:
        try:
            channel = self._open()
            for shard, entries in by_shard.items():
                if shard not in self.declared:
                    declare(channel, shard)
                    self.declared.add(shard)
                for at in range(0, len(entries), ENTRIES_PER_MESSAGE):
                    channel.basic_publish(_message(entries[at:at + ENTRIES_PER_MESSAGE]), exchange="",
                                          routing_key=queue_name(shard))
                    self.sent += 1
            deadline = time.monotonic() + CONFIRM_TIMEOUT
            while self.confirmed < self.sent and self.refused is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("no publisher confirm within 30 s")
                with contextlib.suppress(TimeoutError):  # a quorum queue electing its leader confirms late
                    channel.connection.drain_events(timeout=1)
        except (OSError, amqp.exceptions.AMQPError) as exc:
            self._forget(failed=True)
            raise OSError(f"RabbitMQ: {exc}") from exc
        if self.refused is not None:
            why, self.refused = self.refused, None
            self._forget(failed=True)
            raise OSError(why)

    def durability_warning(self) -> str | None:
        return None  # quorum queues, persistent messages and confirms: RabbitMQ has fsynced what it confirmed

    def _forget(self, *, failed: bool) -> None:
        _let_go(self.conn, failed=failed)
        self.conn, self.channel = None, None

    def close(self) -> None:
        self._forget(failed=False)


class _Shard:
    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.queue = queue_name(shard)
        self.owned = False
        self.free_since: float | None = None  # when a standby first saw it without a consumer


@dataclass(slots=True)
class Item:
    """One entry of a message (or the whole message, when it is bad); the message is acked with its last item."""

    message: Any  # an amqp.Message (py-amqp has no type hints)
    entry: Entry | None
    problem: str = ""
    last: bool = True


class AmqpSource(ShardWriter[_Shard]):
    """A writer's shards on RabbitMQ: exclusive consumers, manual acks once a message's entries are committed."""

    def __init__(self, settings: Settings, folders: Folders, ledger: Ledger) -> None:
        super().__init__(settings, folders, ledger)
        self.url = settings.broker_url or ""
        self.shards = [_Shard(k) for k in sorted(settings.writer_shards)]
        self.conn: Connection | None = None
        self.channel: Any = None
        self.inbox: list[Any] = []  # messages as they arrive
        self.retry: list[Item] = []  # items taken from messages, not handed out yet (or handed back)
        self.polled = 0.0
        self._open()

    def _open(self) -> Any:
        if self.channel is None:
            self.conn, raw = _connect(self.url)
            self.channel = raw.channel()
            self.channel.basic_qos(0, PREFETCH, False)
            for shard in self.shards:
                declare(self.channel, shard.shard)
                shard.owned, shard.free_since = False, None
            self.polled = 0.0
        return self.channel

    def _drop(self, *, failed: bool = True) -> None:
        """Forget the connection; RabbitMQ hands every unacked message back (recognised by its id)."""
        _let_go(self.conn, failed=failed)
        self.conn, self.channel, self.retry = None, None, []
        self.inbox.clear()
        for shard in self.shards:
            shard.owned, shard.free_since = False, None

    def _claim(self) -> None:
        """Become the consumer of every shard that has had none for TAKEOVER_AFTER (at once for a fresh queue)."""
        now = time.monotonic()
        if now - self.polled < POLL_EVERY:
            return
        self.polled = now
        for shard in self.shards:
            if shard.owned:
                continue
            channel = self._open()
            consumers = channel.queue_declare(shard.queue, passive=True).consumer_count
            if consumers:
                shard.free_since = None
                continue
            if shard.free_since is None:
                shard.free_since = now
            if self.standby and now - shard.free_since < TAKEOVER_AFTER:
                continue
            try:
                channel.basic_consume(shard.queue, callback=self.inbox.append, no_ack=False, exclusive=True)
            except amqp.exceptions.AccessRefused:
                self._drop()  # another writer was quicker; the channel is closed: start again
                return
            shard.owned = True
            say(f"owns shard {shard.shard} ({shard.queue})")

    def take(self, limit: int) -> list[Item]:
        if len(self.retry) >= limit:
            batch, self.retry = self.retry[:limit], self.retry[limit:]
            return batch
        try:
            self._claim()
            channel = self.channel
            deadline = time.monotonic() + GATHER_SECONDS
            if channel is not None and any(s.owned for s in self.shards):
                while len(self.inbox) < limit and (left := deadline - time.monotonic()) > 0:
                    try:
                        channel.connection.drain_events(timeout=left)
                    except TimeoutError:
                        break
        except (TimeoutError, OSError, amqp.exceptions.AMQPError) as exc:
            self._drop()
            raise OSError(f"RabbitMQ: {exc}") from exc
        for message in self.inbox:
            self.retry.extend(self._items(message))
        self.inbox.clear()  # in place: the consumer's callback appends to this very list
        batch, self.retry = self.retry[:limit], self.retry[limit:]
        return batch

    def _items(self, message: Any) -> list[Item]:
        """A message's entries not written before; a message with none left is acked at once."""
        try:
            entries = wire.decode_entries(body_bytes(message), message.properties.get("content_type"), message.headers)
        except ValueError as exc:
            return [Item(message, None, str(exc))]
        items = [Item(message, entry, last=False) for entry in entries if entry.id not in self.delivered]
        if not items:
            self._ack(message)  # all written before; its ack was lost
            return []
        items[-1].last = True
        return items

    def _ack(self, message: Any) -> None:
        try:
            self.channel.basic_ack(message.delivery_tag)
        except Exception as exc:  # noqa: BLE001 - committed and its ids kept: a redelivery is skipped
            say(f"RabbitMQ ack failed, reconnecting: {exc}")
            self._drop()

    def key(self, item: Item) -> str:
        what = item.entry.id if item.entry is not None else hashlib.sha256(body_bytes(item.message)).hexdigest()[:16]
        return f"amqp:{what}"

    def set_aside(self, item: Item, why: str) -> Entry:
        return quarantine_message(self.folders, body_bytes(item.message), why, self.durable)

    def ids(self, batch: list[Item]) -> list[str]:
        return [item.entry.id for item in batch if item.entry is not None]

    def acknowledge(self, batch: list[Item]) -> None:
        self.delivered.add(self.ids(batch))
        for item in batch:
            if item.last and self.channel is not None:
                self._ack(item.message)  # a frame, no round trip: RabbitMQ does not answer an ack

    def rewind(self, batch: list[Item]) -> None:
        self.retry = batch + self.retry

    def look_for_input(self) -> None:
        """Messages are pushed to the consumer: nothing to look for."""

    def clean_up(self) -> None:
        """RabbitMQ keeps its own queues."""

    def close(self) -> None:
        self._drop(failed=False)
        self.delivered.close()
