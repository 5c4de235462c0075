"""The web case's app: a bare WSGI app that logs one entry per request with the logger BENCH_LOGGER names."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

MESSAGE = "User 4711 changed the shipping address of order 98-1123; old and new kept in the audit trail"
USERS = 100
KIND = os.environ.get("BENCH_LOGGER", "none")
FOLDER = os.environ.get("BENCH_DIR", ".")
_count = itertools.count()


def _logger() -> Callable[[str], Any]:
    if KIND == "apilog":
        from apilog import logger

        return lambda user: logger.delay("INFO", user, MESSAGE)
    if KIND == "loguru":
        from loguru import logger as lg

        lg.remove()
        lg.add(f"{FOLDER}/loguru.log", enqueue=True, format="{time} {level} {message}")  # before gunicorn forks
        return lambda user: lg.info(MESSAGE)
    if KIND == "stdlib":
        log = logging.getLogger("bench")
        log.addHandler(logging.FileHandler(f"{FOLDER}/stdlib.log"))
        log.setLevel(logging.INFO)
        log.propagate = False
        return lambda user: log.info(MESSAGE)
    return lambda user: None


log_one = _logger()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    log_one(f"user{next(_count) % USERS}")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
