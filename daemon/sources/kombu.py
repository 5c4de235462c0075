"""Any other Celery broker (kombu's transports) as a source and as a forwarder's publisher: manual acks, after commit."""

from __future__ import annotations

import contextlib
import hashlib
import time
from typing import Any

from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import KombuError
from kombu.message import Message

from apilog.core import wire
from apilog.core.entry import Entry
from apilog.core.shards import queue_name
from apilog.settings import Settings, redacted

from ..exceptions import BrokerUnavailable, describe, say
from ..state.folders import Folders
from ..state.ledger import Ledger
from .broker import GATHER_SECONDS, MAX_MESSAGES, DeliveredIds, body_bytes, quarantine_message


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

    def persist_acks(self) -> None:
        self.delivered.sync()

    def drop_consumed(self) -> None:
        """Acked messages are the broker's to forget: nothing to tidy here."""

    def look_for_input(self) -> None:
        """The broker pushes messages to the consumer: nothing to look for."""

    def clean_up(self) -> None:
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

    def acknowledge(self, batch: list[Message]) -> None:
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
