"""Which spool segments grew: inotify on the segments folder, read without blocking between batches.

Every producer's append is one event: they are read in bulk from the inotify descriptor in the
drain loop itself (inotify_simple), never dispatched one by one through a watcher thread, so tens
of thousands of appends a second cost the daemon next to nothing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from inotify_simple import INotify, flags

_EVENTS = flags.MODIFY | flags.CREATE | flags.MOVED_TO | flags.CLOSE_WRITE


class Appends:
    """Names of segments written to since the last `take()`; `None` from `take()` means "look at them all"."""

    def __init__(self, folder: Path) -> None:
        self.inotify: INotify | None = None
        try:
            self.inotify = INotify(nonblocking=True)
            self.inotify.add_watch(folder, _EVENTS)
        except OSError:  # inotify's limits: the reader then looks at each segment's size instead
            self.close()

    @property
    def watching(self) -> bool:
        return self.inotify is not None

    def fileno(self) -> int | None:
        """Readable once an event waits (None when not watching)."""
        return None if self.inotify is None else self.inotify.fileno()

    def take(self) -> set[str] | None:
        if self.inotify is None:
            return set()
        names: set[str] = set()
        while events := self.inotify.read(timeout=0):
            for event in events:
                if event.mask & flags.Q_OVERFLOW:
                    return None  # events were lost
                names.add(event.name)
        return names

    def close(self) -> None:
        if self.inotify is not None:
            with contextlib.suppress(OSError):
                self.inotify.close()
            self.inotify = None
