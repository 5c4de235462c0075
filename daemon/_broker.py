"""Any Celery broker as a source: messages consumed with manual acks, acked after their batch is committed.

A broker may deliver a message again (a crash after the commit but before the ack, a
visibility timeout): the ids of committed batches are kept, and a message seen again is
acked without being written twice.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import deque
from pathlib import Path

from kombu import Connection, Consumer, Exchange, Queue
from kombu.exceptions import KombuError
from kombu.message import Message

from apilog import _message, spool
from apilog._atomic import write_atomic
from apilog._entry import Entry
from apilog.settings import Settings, redacted

from ._batch import BatchWriter
from .exceptions import BrokerUnavailable

MAX_MESSAGES = 2048
GATHER_SECONDS = 0.05  # how long a batch waits to fill up
REMEMBERED_IDS = 200_000
DELIVERED_NAME = "delivered.ids"


class DeliveredIds:
    """Ids of the most recent committed entries, in memory and in an append-only file."""

    def __init__(self, path: Path, *, durable: bool) -> None:
        self.path = path
        self.durable = durable
        self._order: deque[str] = deque()
        self._set: set[str] = set()
        try:
            known = path.read_text().split()
        except FileNotFoundError:
            known = []
        self._lines = len(known)
        self._remember(known)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._set

    def add(self, ids: list[str]) -> None:
        fresh = [i for i in ids if i not in self._set]
        if not fresh:
            return
        with open(self.path, "a", encoding="ascii") as log:
            log.write("".join(f"{i}\n" for i in fresh))
            if self.durable:
                log.flush()
                os.fsync(log.fileno())
        self._lines += len(fresh)
        self._remember(fresh)
        if self._lines > 2 * REMEMBERED_IDS:  # keep the file about as short as the memory
            write_atomic(self.path, "".join(f"{i}\n" for i in self._order).encode(), durable=self.durable)
            self._lines = len(self._order)

    def _remember(self, ids: list[str]) -> None:
        for entry_id in ids:
            self._order.append(entry_id)
            self._set.add(entry_id)
        while len(self._order) > REMEMBERED_IDS:
            self._set.discard(self._order.popleft())


class BrokerDrainer(BatchWriter):
    """Moves apilog task messages from a Celery broker (APILOG_BROKER_URL) into their files."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        assert settings.broker_url is not None
        self.quarantine_dir = spool.ensure(settings.spool_dir)["quarantine"]
        self.delivered = DeliveredIds(settings.state_dir / DELIVERED_NAME, durable=self.durable)
        self.delivered.add(self.ledger.last_ids)  # a crash may have come between the commit and this file
        self.source = redacted(settings.broker_url)
        self.queue = Queue(_message.QUEUE, Exchange(_message.QUEUE, type="direct"), routing_key=_message.QUEUE)
        self.inbox: list[Message] = []
        self.retry: list[Message] = []  # a batch that failed to be written, tried again as it was
        self.connection: Connection | None = None
        try:
            self._connect()
        except OSError as exc:
            super().close()
            raise BrokerUnavailable(str(exc)) from None

    def _connect(self) -> None:
        try:
            self.connection = Connection(self.settings.broker_url)
        except Exception as exc:  # kombu fails in many ways when a transport's client library is missing
            raise OSError(f"cannot use the broker {self.source} ({exc!r}); is its client library installed?") from exc
        try:
            self.connection.ensure_connection(max_retries=1)
        except (*self.connection.connection_errors, KombuError, OSError) as exc:
            self.connection = None
            raise OSError(f"cannot reach the broker {self.source}: {exc}") from exc
        self.consumer = Consumer(self.connection.channel(), queues=[self.queue], on_message=self.inbox.append,
                                 no_ack=False, prefetch_count=MAX_MESSAGES)
        self.consumer.consume()

    def close(self) -> None:
        if self.connection is not None:
            self.connection.release()  # unacked messages go back to the broker
        super().close()

    def take(self) -> list[Message]:
        if self.retry:
            batch, self.retry = self.retry, []
            return batch
        if self.connection is None:
            self._connect()
        connection = self.connection
        assert connection is not None
        deadline = time.monotonic() + GATHER_SECONDS
        try:
            while len(self.inbox) < MAX_MESSAGES and (left := deadline - time.monotonic()) > 0:
                connection.drain_events(timeout=left)
        except (socket.timeout, TimeoutError):
            pass
        except (*connection.connection_errors, KombuError, OSError) as exc:
            connection.release()
            self.connection, self.inbox[:] = None, []  # unacked: the broker delivers them again
            raise OSError(f"broker connection lost: {exc}") from exc
        batch, self.inbox[:] = list(self.inbox), []
        fresh = []
        for message in batch:
            if message.headers.get("id") in self.delivered:
                message.ack()  # written before; its ack was lost
            else:
                fresh.append(message)
        return fresh

    def entry(self, message: Message) -> Entry:
        try:
            return Entry.from_wire(_message.decode_body(message.body, message.content_type, message.headers))
        except ValueError as exc:  # BadMessage included
            why = str(exc)
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        return self.quarantine(self.quarantine_dir / f"broker.{uuid.uuid4().hex}.msg", body, "broker message", why)

    def ids(self, batch: list[Message]) -> list[str]:
        return [str(m.headers.get("id")) for m in batch if m.headers.get("id")]

    def committed(self, batch: list[Message], consumed: dict[str, int]) -> None:
        self.delivered.add(self.ids(batch))
        for message in batch:
            message.ack()

    def rewind(self, batch: list[Message] | None = None) -> None:
        if batch:
            self.retry = batch  # still unacked: written again, as it was, on the next step
