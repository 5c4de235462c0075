"""Which live log files changed: watchdog events on the log tree, polling once inotify's limits are hit."""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from apilog.core.logfile import ARCHIVE

# watchdog logs an error when its thread stops while events still arrive (a stop of a busy daemon): not a fault.
logging.getLogger("watchdog.observers.inotify").addFilter(lambda record: "thread is inactive" not in record.getMessage())

POLL_SECONDS = 2.0
_EVENTS = [FileCreatedEvent, FileMovedEvent, DirCreatedEvent, DirMovedEvent]
# watchdog warns when a new folder's watch races its creation event; the watch is kept either way.
warnings.filterwarnings("ignore", message="Callback with id .* already exists", category=RuntimeWarning)


class _Collector(FileSystemEventHandler):
    """Remembers live files named by events; many events for one file count once."""

    def __init__(self, root: Path, suffix: str) -> None:
        self.root = str(root) + "/"
        self.suffix = suffix
        self.lock = threading.Lock()
        self.changed: set[str] = set()

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = event.dest_path or event.src_path if event.event_type == "moved" else event.src_path
        path = path.decode() if isinstance(path, bytes) else path
        if event.is_directory or not path.startswith(self.root) or not path.endswith(self.suffix):
            return
        relpath = path[len(self.root):]
        if relpath.startswith(ARCHIVE + "/"):
            return
        with self.lock:
            self.changed.add(relpath)


class ChangeWatcher:
    """Watches the log tree; `take()` returns the live files that changed since the last call."""

    def __init__(self, root: Path, suffix: str) -> None:
        self.root = root
        self.collector = _Collector(root, suffix)
        self.mode = "inotify"
        self.fallback_reason: str | None = None
        self.observer = self._start(polling=False)

    def _start(self, *, polling: bool) -> BaseObserver | None:
        try:
            observer: BaseObserver = PollingObserver(timeout=POLL_SECONDS) if polling else Observer()
            # Files others create or move; the daemon counts its own appends (Archiver.grew), unwatched.
            observer.schedule(self.collector, str(self.root), recursive=True, event_filter=_EVENTS)
            observer.start()
        except OSError as exc:  # inotify's watch or instance limit: poll instead
            if polling:
                raise
            self.fallback_reason = f"inotify unavailable ({exc.strerror or exc}); polling every {POLL_SECONDS:.0f}s"
            self.mode = "polling"
            return self._start(polling=True)
        return observer

    def check(self, folders: int) -> str | None:
        """Fall back to polling when inotify watches fewer than the tree's `folders`; return why, once."""
        if self.mode != "inotify" or self.observer is None:
            return None
        watched = 0
        for emitter in self.observer.emitters:
            # watchdog skips a sub-folder it cannot watch (inotify's limit) without a word: count them.
            group = getattr(emitter, "_inotify", None)
            paths = getattr(group, "_active_callbacks_by_path", None)
            if paths is None or not emitter.is_alive():
                return None if paths is None and emitter.is_alive() else self._poll("inotify stopped")
            watched += len(paths)
        if watched < folders:
            return self._poll(f"inotify watches {watched} of {folders} folders (its limit?)")
        return None

    def _poll(self, why: str) -> str:
        self.stop()
        self.fallback_reason = f"{why}; polling every {POLL_SECONDS:.0f}s"
        self.mode = "polling"
        self.observer = self._start(polling=True)
        return self.fallback_reason

    def take(self) -> set[str]:
        with self.collector.lock:
            changed, self.collector.changed = self.collector.changed, set()
        return changed

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
