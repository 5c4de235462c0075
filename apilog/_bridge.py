"""`LoggingHandler`: stdlib logging records become apilog entries of the current user."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .core.context import current_user
from .core.logfile import SYSTEM

DEFAULT_STREAMS: Mapping[int, str] = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARN",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "ERROR",
}


class LoggingHandler(logging.Handler):
    """Sends each record to `logger.delay()`: stream by level, location from `extra={"user": ...}`,
    else the current `apilog.user(...)`, else "system"; the formatted record (traceback included) as message."""

    def __init__(self, level: int = logging.NOTSET, streams: Mapping[int, str] | None = None) -> None:
        super().__init__(level)
        self.streams = sorted((streams or DEFAULT_STREAMS).items())

    def stream_for(self, levelno: int) -> str:
        """The stream of the highest mapped level at or below `levelno`."""
        chosen = self.streams[0][1]
        for level, stream in self.streams:
            if levelno >= level:
                chosen = stream
        return chosen

    def emit(self, record: logging.LogRecord) -> None:
        from ._task import logger  # Celery loads only once a record is logged

        try:
            location = getattr(record, "user", None) or current_user() or SYSTEM
            logger.delay(self.stream_for(record.levelno), location, self.format(record))
        except Exception:  # noqa: BLE001 - a handler must never raise into the code that logged
            self.handleError(record)
