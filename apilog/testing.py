"""Capture entries in memory in an app's own tests: nothing reaches the spool while capturing.

    from apilog.testing import capture

    def test_login_is_logged():
        with capture() as entries:
            login("carol")
        assert entries[0].streams == ["LOGIN"] and entries[0].location == "carol"
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from . import _task
from .core.entry import Entry


@contextmanager
def capture() -> Iterator[list[Entry]]:
    """Collect every entry `logger.delay()` accepts, checked exactly as it would be spooled."""
    entries: list[Entry] = []
    _task.captures.append(entries)
    try:
        yield entries
    finally:
        _task.captures.remove(entries)
