"""The logging task: `logger.delay()` checks the call, then spools one Celery message per entry."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import kombu.transport
from celery import Celery, Task
from kombu import Exchange, Queue

from . import settings
from .core import wire
from .core.entry import Entry, build
from .core.jsonsafe import jsonable
from .core.logfile import SYSTEM
from .core.route import render, route
from .core.shards import broker_kind, queue_name, shard_of
from .core.streams import INTERNAL, Registry
from .core.tree import LogTree
from .exceptions import BadInput, ConfigError, SpoolError
from .spool.frame import HEADER as FRAME_HEADER
from .spool.limits import REASONS, limits_for
from .spool.transport import writer_for

# kombu resolves "apilog://" to the embedded spool.
kombu.transport.TRANSPORT_ALIASES.setdefault("apilog", "apilog.spool.transport:Transport")


@dataclass(frozen=True, slots=True)
class Receipt:
    """What `delay()` returns: the entry's id, and whether it reached the spool."""

    id: str
    spooled: bool

    @property
    def task_id(self) -> str:
        return self.id


class _CeleryConfig:
    """The Celery settings of apilog's own app (what `celery -A apilog worker` runs with)."""

    task_serializer = "json"
    accept_content = ("json",)
    task_ignore_result = True
    task_default_queue = queue_name(0)
    # Features that only cost a filesystem broker (NOTES.md): no events, no remote control.
    worker_send_task_events = False
    worker_enable_remote_control = False

    broker_url = "apilog://"  # the spool; a stock worker gets APILOG_BROKER_URL from _for_stock_workers()


_registries: dict[str, Registry] = {}
captures: list[list[Entry]] = []  # innermost apilog.testing.capture() last


def registry_for(conf: settings.Settings) -> Registry:
    """One stream registry per home, shared by every call in this process."""
    key = str(conf.home)
    found = _registries.get(key)
    if found is None:
        found = _registries[key] = Registry(conf.home)
    return found


class LogTask(Task):  # type: ignore[misc]
    """`logger`: a real Celery task whose `delay()` never raises into the app for a logging problem."""

    name = wire.TASK_NAME
    ignore_result = True
    typing = False  # the call is checked by apilog, which routes bad input to INTERNAL
    # For a stock Celery worker on another broker: acknowledge only once the entry is written,
    # and hand the message back if the worker dies (at least once; apilogd's own drain is exactly once).
    acks_late = True
    reject_on_worker_lost = True

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        return self._submit(args, kwargs, {})

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        return self._submit(tuple(args or ()), dict(kwargs or {}), options)

    def _submit(self, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]) -> Any:
        try:
            conf = settings.current()
        except ConfigError as exc:
            print(f"apilog: entry not logged: {exc}; entry: {jsonable([args, kwargs])!r}", file=sys.stderr)
            if os.environ.get("APILOG_STRICT", "").strip() in ("1", "true", "yes", "on"):
                raise
            return Receipt("", spooled=False)
        entry, screen = _checked_entry(args, kwargs, conf)
        task_id = options.pop("task_id", None)
        if isinstance(task_id, str) and 0 < len(task_id) <= 64:
            entry.id = task_id  # apply_async(task_id=...) names the entry
        if entry.problems and conf.strict:
            raise BadInput("; ".join(entry.problems))
        if screen:
            print(render(entry, "SCREEN", entry.location, conf, message=entry.message,
                         heading=entry.heading, dict_to_string=entry.dict_to_string), end="", flush=True)
        if not entry.streams and not entry.problems:
            return Receipt(entry.id, spooled=False)
        if captures:  # apilog.testing.capture(): the app's tests read entries from memory
            captures[-1].append(entry)
            return Receipt(entry.id, spooled=False)
        try:
            if self is logger:  # never the network: a forwarder takes the spool to the broker (docs/many-hosts.md)
                return _spool(entry, conf)
            # The task registered on an app's own Celery (`register()`) travels on that app's broker.
            options.setdefault("queue", queue_name(shard_of(entry.location, conf.shards)))
            return super().apply_async(args=(), kwargs={"entry": entry.to_wire()}, task_id=entry.id, **options)
        except Exception as exc:  # the spool or broker refused: the entry must still be seen somewhere
            print(f"apilog: entry not spooled ({exc}): {wire.task_body(entry).decode()}", file=sys.stderr)
            if conf.strict:
                raise SpoolError(str(exc)) from exc
            return Receipt(entry.id, spooled=False)

    def run(self, *args: Any, entry: dict[str, Any] | None = None, entries: list[dict[str, Any]] | None = None,
            **kwargs: Any) -> None:
        """Write the message's entry (or a forwarder's several) now: what a stock Celery worker does with it."""
        conf = settings.current()
        if entries is not None:
            items = [Entry.from_wire(e) for e in entries]
        else:
            items = [Entry.from_wire(entry) if entry is not None else _checked_entry(args, kwargs, conf)[0]]
        tree = LogTree(conf.log_dir)
        try:
            for item in items:
                for relpath, text in route(item, registry_for(conf).names(), conf):
                    fd = tree.open_append(relpath)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX)  # apilogd may append to the same file
                        os.write(fd, text.encode("utf-8"))
                    finally:
                        os.close(fd)
        finally:
            tree.close()


_last_drop_said = [0.0]  # when this process last said on stderr that it drops entries


def _spool(entry: Entry, conf: settings.Settings) -> Receipt:
    """Append the entry to the spool, unless its user's rate or the spool's budget says drop it (counted, noted later)."""
    payload = wire.encode(entry)
    size = FRAME_HEADER.size + len(payload)
    limits = limits_for(conf.spool_dir, conf.user_rate, conf.user_burst, conf.spool_max)
    if limits is not None:
        reason = limits.admit(entry.location, entry.streams or [INTERNAL], size, limited=entry.location != SYSTEM)
        if reason:
            now = time.monotonic()
            if now - _last_drop_said[0] >= 60 or not _last_drop_said[0]:  # a line a minute, never one per entry
                _last_drop_said[0] = now
                print(f"apilog: dropping entries ({REASONS[reason]}); each is counted and noted in its user's file",
                      file=sys.stderr)
            return Receipt(entry.id, spooled=False)
    try:
        writer_for(conf.spool_dir, conf.fsync == "always").append(payload)
    except BaseException:
        if limits is not None:
            limits.unappend(size)
        raise
    return Receipt(entry.id, spooled=True)


def _checked_entry(args: tuple[Any, ...], kwargs: dict[str, Any], conf: settings.Settings) -> tuple[Entry, bool]:
    def checked(*call: Any, **named: Any) -> tuple[Entry, bool]:
        return build(*call, **named, registry=registry_for(conf), timestamps_default=conf.timestamps,
                     max_entry_bytes=conf.max_entry_bytes)

    try:
        return checked(*args, **kwargs)
    except TypeError as exc:  # a call delay() does not take: keep all it was given
        entry, _ = checked(None, SYSTEM, {"args": jsonable(list(args)), "kwargs": jsonable(kwargs)})
        entry.streams = []
        entry.problems.append(f"bad call: {exc}")
        entry.original = {"stream": None, "location": None}
        return entry, False


def _for_stock_workers(celery_app: Celery) -> None:
    """`celery -A apilog worker -Q apilog.0,...`: APILOG_BROKER_URL's shard queues, declared as apilogd declares them."""
    try:
        conf = settings.current()
    except ConfigError:
        return  # delay() reports a bad setting on its first call
    if conf.broker_url is None:
        return
    quorum = broker_kind(conf.broker_url) == "rabbitmq"
    celery_app.conf.broker_url = conf.broker_url
    celery_app.conf.task_queues = [
        Queue(queue_name(k), Exchange(queue_name(k), type="direct"), routing_key=queue_name(k), durable=True,
              queue_arguments={"x-queue-type": "quorum"} if quorum else None)
        for k in range(conf.shards)
    ]


app = Celery("apilog", set_as_current=False)
app.config_from_object(_CeleryConfig())
_for_stock_workers(app)
logger: LogTask = app.register_task(LogTask())


def register(celery_app: Celery) -> LogTask:
    """Add the logging task to an app that already runs Celery; entries then travel on its broker."""
    # Celery binds the app to the task *class*: a subclass keeps apilog's own `logger` bound to its app.
    bound = type("LogTask", (LogTask,), {"__module__": __name__})
    task: LogTask = celery_app.register_task(bound())
    return task
