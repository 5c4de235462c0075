"""Stream names and the registry of known streams kept in `$APILOG_HOME/streams.json`."""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from ..exceptions import StreamError
from .atomic import write_atomic

DEFAULT_STREAMS = (
    "INFO",
    "WARN",
    "DEBUG",
    "LOGIN",
    "ERROR",
    "SECURITY ALERT",
    "STRANGE ACTIVITY",
    "INTERNAL",
)
INTERNAL = "INTERNAL"
SCREEN = "SCREEN"  # printed by the caller, never spooled
RECHECK_SECONDS = 1.0  # how stale the caller's view of the registry may be (apilogd checks every batch)
MAX_STREAMS = 256  # a flood of names must not grow the registry without bound

_NAME = re.compile(r"[A-Z0-9_-]+(?: [A-Z0-9_-]+)*")


def normalize(name: str) -> str:
    """Upper-case and check a stream name; raise StreamError when it is not one."""
    upper = name.strip().upper()
    if not 1 <= len(upper) <= 32 or not _NAME.fullmatch(upper):
        raise StreamError(
            f"bad stream name {name!r}: use 1-32 of A-Z 0-9 _ - and single inner spaces"
        )
    return upper


class Registry:
    """The set of known streams, re-read whenever the file changes on disk."""

    def __init__(self, home: Path) -> None:
        self.path = home / "streams.json"
        self._stamp: tuple[int, int, int] | None = None
        self._names: tuple[str, ...] = DEFAULT_STREAMS
        self._looked = -RECHECK_SECONDS  # monotonic time of the last look at the file

    def names(self, *, cached: bool = False) -> tuple[str, ...]:
        """Known streams in registry order; the defaults while no registry exists.

        `cached` (the caller's hot path) looks at the file at most once a second; a name not
        found there is looked for again at once (`normalize`d names only: see `_entry._targets`).
        """
        now = time.monotonic()
        if cached and now - self._looked < RECHECK_SECONDS:
            return self._names
        self._looked = now
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._names = None, DEFAULT_STREAMS
            return self._names
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._names = self._read()
            self._stamp = stamp
        return self._names

    def __contains__(self, stream: str) -> bool:
        return stream in self.names()

    def _read(self) -> tuple[str, ...]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            names = tuple(normalize(n) for n in data["streams"])
        except (OSError, ValueError, KeyError, TypeError, StreamError):
            # A damaged registry must not stop logging: keep what we knew.
            return self._names
        return names if INTERNAL in names else (*names, INTERNAL)

    def add(self, name: str) -> str:
        """Register a stream; return its normalized name."""
        stream = normalize(name)
        if stream == SCREEN:
            raise StreamError("SCREEN is a pseudo-stream and cannot be registered")
        with self._locked():
            names = self._read_fresh()
            if stream not in names:
                if len(names) >= MAX_STREAMS:
                    raise StreamError(f"the registry holds {MAX_STREAMS} streams, the most it takes")
                self._write((*names, stream))
        return stream

    def remove(self, name: str) -> str:
        """Unregister a stream (its files stay); return its normalized name."""
        stream = normalize(name)
        if stream == INTERNAL:
            raise StreamError("INTERNAL cannot be removed: apilog reports about itself there")
        with self._locked():
            names = self._read_fresh()
            if stream not in names:
                raise StreamError(f"no stream named {stream!r}")
            self._write(tuple(n for n in names if n != stream))
        return stream

    def _read_fresh(self) -> tuple[str, ...]:
        self._stamp = None
        return self.names()

    def _write(self, names: Iterable[str]) -> None:
        body = json.dumps({"streams": list(names)}, indent=2) + "\n"
        write_atomic(self.path, body.encode(), mode=0o640)  # the daemon's alone to change (D8)
        self._stamp = None

    def _locked(self) -> _FileLock:
        return _FileLock(self.path.with_name("streams.lock"))


class _FileLock:
    """An exclusive flock held for a `with` block: serializes registry edits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
