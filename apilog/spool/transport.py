"""A kombu transport over the spool, so Celery's own publishing path writes the same records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kombu.transport import virtual
from kombu.utils.json import dumps

from .. import settings
from .backlog import committed_offsets, waiting
from .writer import SpoolWriter

_writers: dict[Path, SpoolWriter] = {}


def writer_for(spool_dir: Path, fsync: bool) -> SpoolWriter:
    """The one writer of this process for a spool folder."""
    found = _writers.get(spool_dir)
    if found is None:
        found = _writers[spool_dir] = SpoolWriter(spool_dir, fsync=fsync)
    return found


class Channel(virtual.Channel):
    """Publishes into the spool; consuming belongs to apilogd, which commits before it acks."""

    def _writer(self) -> SpoolWriter:
        conf = settings.current()
        options = self.connection.client.transport_options
        spool_dir = Path(options.get("spool_dir") or conf.spool_dir)
        return writer_for(spool_dir, conf.fsync == "always")

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self._writer().append(dumps(message).encode())

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        raise NotImplementedError("the apilog spool is drained by apilogd: run `apilogd run`")

    def _size(self, queue: str) -> int:
        conf = settings.current()
        return waiting(conf.spool_dir, committed_offsets(conf.state_dir))[0]

    def _purge(self, queue: str) -> int:
        raise NotImplementedError("the apilog spool is never purged: every entry is kept")

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        """Queues need no setup: every message goes to the spool's segments."""

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return True

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        """Nothing to delete: the spool outlives any queue declaration."""


class Transport(virtual.Transport):
    """`apilog.spool.transport:Transport`: kombu's name for the embedded spool."""

    Channel = Channel
    driver_type = "filesystem"
    driver_name = "apilog-spool"

    def driver_version(self) -> str:
        return "1"
