"""Shared fixtures: a private APILOG_HOME per test, and a real apilogd process."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from apilogd import _control

from apilog import settings

STAMP = re.compile(r" \u00a7 \[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty APILOG_HOME with every other APILOG_ variable cleared."""
    for name in list(os.environ):
        if name.startswith("APILOG_") or name in ("STATE_DIRECTORY", "LOGS_DIRECTORY", "NOTIFY_SOCKET"):
            monkeypatch.delenv(name)
    path = tmp_path / "home"
    monkeypatch.setenv("APILOG_HOME", str(path))
    settings.reset()
    yield path
    settings.reset()


@pytest.fixture
def daemon(home: Path) -> Iterator[Path]:
    """A real `apilogd` running in the background for this home; stopped afterwards."""
    _control.start(settings.load())
    yield home
    _control.stop(settings.load())


def wait_written(timeout: float = 20.0) -> None:
    """Wait until apilogd has committed everything waiting in the spool."""
    conf = settings.load()
    deadline = time.monotonic() + timeout
    while _control.status(conf).backlog:
        assert time.monotonic() < deadline, "apilogd did not drain the spool in time"
        time.sleep(0.02)


def wait_for(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `check` until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def log_file(home: Path, relpath: str) -> str:
    return (home / "logs" / relpath).read_text(encoding="utf-8")


def unstamp(text: str, since: float, until: float) -> str:
    """`text` with every timestamp checked to lie in [since, until] (UTC) and replaced by `<TS>`."""

    def check(match: re.Match[str]) -> str:
        when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
        assert int(since) <= when.timestamp() <= until, f"timestamp {match.group(1)} is not the call's time"
        return " \u00a7 [<TS>]"

    return STAMP.sub(check, text)
