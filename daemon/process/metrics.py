"""The daemon's counters in Prometheus form: kept in the process, refreshed in a textfile for node_exporter."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, write_to_textfile

METRICS_FOLDER = "metrics"  # under $APILOG_HOME, for node_exporter's textfile collector
TEXTFILE_NAME = "apilogd.prom"
EXACT_BACKLOG_BYTES = 1 << 20  # above this the entries waiting are estimated from their bytes, not counted
UP_HELP = "1 while apilogd runs; 0 once it stopped cleanly"


def textfile_path(home: Path) -> Path:
    return home / METRICS_FOLDER / TEXTFILE_NAME


def stopped(backlog: int | None, quarantine_files: int) -> str:
    """What `apilogd metrics` says with no daemon running: no counters, only what waits and what was set aside."""
    registry = CollectorRegistry()
    Gauge("apilog_up", UP_HELP, registry=registry).set(0)
    if backlog is not None:
        Gauge("apilog_backlog_entries", "Entries waiting in the spool", registry=registry).set(backlog)
    Gauge("apilog_quarantine_files", "Files in the spool's quarantine folder", registry=registry).set(quarantine_files)
    return generate_latest(registry).decode()


class Metrics:
    """What one apilogd process did since it started, and how much waits (docs/operations.md, "Monitoring")."""

    def __init__(self, home: Path) -> None:
        self.path = textfile_path(home)
        self.registry = registry = CollectorRegistry()
        self.up = Gauge("apilog_up", UP_HELP, registry=registry)
        self.refreshed = Gauge("apilog_last_refresh_timestamp_seconds",
                               "When apilogd last wrote this file (a stale value: the daemon died)", registry=registry)
        self.started = Gauge("apilog_start_timestamp_seconds", "When this apilogd process started", registry=registry)
        self.written = Counter("apilog_entries_written", "Spool or broker items committed to their files", registry=registry)
        self.batches = Counter("apilog_batches", "Batches committed (one journal record, one fdatasync each)",
                               registry=registry)
        self.batch_seconds = Histogram("apilog_batch_seconds", "Time to read, render, journal and append one batch",
                                       buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
                                       registry=registry)
        self.quarantined = Counter("apilog_quarantined", "Items set aside into quarantine (undecodable, forged, poison)",
                                   registry=registry)
        self.errors = Counter("apilog_errors", "Failures the daemon retried, by kind", ["kind"], registry=registry)
        self.rotations = Counter("apilog_rotations", "Live files rotated into the archive", registry=registry)
        self.backlog_bytes = Gauge("apilog_backlog_bytes", "Bytes waiting in the spool", registry=registry)
        self.backlog_entries = Gauge("apilog_backlog_entries",
                                     f"Entries waiting in the spool (counted up to {EXACT_BACKLOG_BYTES} bytes, "
                                     "estimated from the bytes above)", registry=registry)
        self.written_last_minute = Gauge("apilog_written_last_minute", "Items committed in the last 60 s",
                                         registry=registry)
        self.suppressed = Counter("apilog_suppressed", "Entries dropped and counted in a suppression note, by reason",
                                  ["reason"], registry=registry)
        self.log_disk_full = Gauge("apilog_log_disk_full", "1 while batches wait for room on the log file system",
                                   registry=registry)
        for reason in ("rate limit", "spool full", "log space", "quota"):
            self.suppressed.labels(reason=reason)
        for kind in ("write", "batch", "rotation"):
            self.errors.labels(kind=kind)  # present at 0 from the start, so a rate() sees the first one
        self._entry_bytes = 400.0  # a typical spooled entry, until a count says otherwise
        self.up.set(1)
        self.started.set(time.time())

    def batch(self, items: int, seconds: float) -> None:
        self.written.inc(items)
        self.batches.inc()
        self.batch_seconds.observe(seconds)

    def backlog(self, waiting_bytes: int, count: Callable[[], int]) -> None:
        """Set the backlog: `count()` (a read of the spool) up to EXACT_BACKLOG_BYTES; above, the bytes over the
        size of an entry the last count saw (a scan of a large spool every few seconds would cost the drain)."""
        self.backlog_bytes.set(waiting_bytes)
        if waiting_bytes <= EXACT_BACKLOG_BYTES:
            entries = count() if waiting_bytes else 0  # idle: no scan of the segments every report
            if entries:
                self._entry_bytes = waiting_bytes / entries
            self.backlog_entries.set(entries)
        else:
            self.backlog_entries.set(round(waiting_bytes / self._entry_bytes))

    def write(self) -> None:
        """Refresh the textfile (written aside and renamed over: node_exporter never reads half of it); 0644."""
        self.refreshed.set(time.time())
        self.path.parent.mkdir(mode=0o755, exist_ok=True)
        write_to_textfile(str(self.path), self.registry)
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o644)  # node_exporter runs as its own user
