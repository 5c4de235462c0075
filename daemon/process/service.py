"""`apilogd run`: hold the instance lock, recover, then drain the spool until SIGTERM."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import select
import signal
import time
import traceback
from collections import deque
from types import FrameType

from apilog.core.entry import internal
from apilog.core.folder import UnsafePath
from apilog.settings import Settings
from apilog.spool.backlog import waiting as waiting_entries

from ..archive.archiver import Archiver
from ..commit.batch import BatchWriter
from ..commit.drainer import Drainer
from ..commit.forward import Forwarder
from ..exceptions import DaemonError, UnsafeSetup, describe, say
from ..sources import open_source
from ..state.folders import open_folders, open_home
from .control import STATS_NAME, answer_archive_request
from .instance import InstanceLock
from .metrics import Metrics
from .notify import notify

IDLE_WAIT = 0.05  # seconds between looks at an empty spool, at first
IDLE_WAIT_MAX = 0.25  # after a while of nothing to do: an idle look at thousands of segments is not free
IDLE_WAIT_WOKEN_MAX = 1.0  # the same where an append wakes the loop (inotify): the look is only a backstop
LINGER, LINGER_BELOW = 0.025, 1024  # after a batch under LINGER_BELOW items, wait LINGER seconds for more
SCAN_EVERY = 0.5  # seconds between looks for new segments while busy
SWEEP_EVERY = 60.0  # seconds between tidyings of the spool's tmp folder
BACKOFF_MAX = 10.0  # well inside WatchdogSec=, which the loop must keep feeding
DISK_FULL_RETRY = 1.0  # seconds between tries while the log disk is full
REPORT_EVERY = 2.0  # seconds between STATUS= lines and state/stats.json updates


def _raise_descriptor_limit() -> None:
    """Many producers and many users' files: take every descriptor the hard limit allows (systemd's soft one is 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Signals:
    """SIGTERM/SIGINT (stop) and SIGUSR1 (`apilog archive`) as flags, and a sleep they cut short.

    A handler may run between any two bytecodes of the main thread, even inside
    `threading.Event.wait()` while it holds the Event's lock, where `Event.set()` deadlocks: so the
    handlers only set flags, and the C-level wakeup fd ends the sleep.
    """

    def __init__(self) -> None:
        self.stop = False
        self.archive = False
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_archive)
        # Past RLIMIT_FSIZE a write must fail with EFBIG (that file's entries are diverted), not kill us.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop = True

    def _on_archive(self, signum: int, frame: FrameType | None) -> None:
        self.archive = True

    def sleep(self, seconds: float, wake: int | None = None) -> None:
        """Sleep until a signal, `seconds`, or (when given) the descriptor `wake` is readable."""
        if not self.stop:
            select.select([self._read] if wake is None else [self._read, wake], [], [], seconds)
        with contextlib.suppress(BlockingIOError):
            os.read(self._read, 512)


class Service:
    """The running daemon: one drain loop, stopped by SIGTERM or SIGINT after its current batch."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Before the pidfile exists: a SIGTERM during start-up stops us cleanly once started.
        self.signals = _Signals()
        self.written: deque[tuple[float, int]] = deque()  # (when, entries) of the last minute's batches
        self.metrics = Metrics(settings.home)
        self.last_report = 0.0
        usec = os.environ.get("WATCHDOG_USEC", "")
        watched = os.environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        self.watchdog_every = int(usec) / 2e6 if usec.isdigit() and watched else None
        self.last_ping = 0.0
        self.stats_failed = False
        self.metrics_failed = False
        self.disk_full = False  # the last batch waited for room on the log file system
        self.suppressed_counted: dict[str, int] = {}  # drops already added to the metric, by reason

    def run(self) -> int:
        conf = self.settings
        _raise_descriptor_limit()
        with contextlib.ExitStack() as stack:  # released in reverse: archiver, drainer, folders, lock, home
            try:
                home = stack.enter_context(open_home(conf))
                stack.callback(InstanceLock(home).release)
                folders = open_folders(conf, home)
                stack.callback(folders.close)
                if conf.role == "forward":
                    drainer: Drainer = Forwarder(conf, folders)
                    stack.callback(drainer.close)
                    archiver = None  # a forwarder writes no log files
                else:
                    drainer = BatchWriter(conf, folders, open_source(conf, folders))
                    stack.callback(drainer.close)
                    archiver = Archiver(conf, drainer)
                    stack.callback(archiver.close)
                crashed = drainer.probe.start()
            except UnsafePath as exc:
                raise UnsafeSetup(str(exc)) from None
            except OSError as exc:  # one line, not a traceback; systemd tries again (the disk may come back)
                where = f" ({exc.filename})" if exc.filename else ""
                raise DaemonError(f"cannot start: {describe(exc)}{where}") from None
            if crashed:
                say("the last run did not stop cleanly: inputs are probed one at a time until a batch commits")
            drainer.source.clean_up()
            drainer.source.look_for_input()
            notify(f"READY=1\nMAINPID={os.getpid()}")
            if isinstance(drainer, Forwarder):
                say(f"forwarding {drainer.source.name} to {drainer.publisher.name} in {conf.shards} shards")
                warning = drainer.publisher.durability_warning()
                if warning:
                    say(f"warning: {warning}")
            else:
                say(f"draining {drainer.source.name} into {conf.log_dir}")
            self._loop(drainer, archiver)
            notify("STOPPING=1")
            self._last_notes(drainer, archiver)
            try:
                drainer.checkpoint()  # a clean stop leaves nothing to redo
            except OSError as exc:  # stopping all the same: the journal has the batches
                say(f"could not make the last batches durable in their files ({describe(exc)}); "
                    "the journal redoes them at the next start")
            drainer.probe.stop()  # a clean stop: the next start suspects nothing
            self.metrics.up.set(0)
            with contextlib.suppress(OSError):
                self.metrics.write()
        say("stopped")
        return 0

    def _loop(self, drainer: Drainer, archiver: Archiver | None) -> None:
        signals = self.signals
        backoff = 0.0
        failure: str | None = None
        idle, last_scan, last_sweep = True, 0.0, time.monotonic()
        idle_wait = IDLE_WAIT
        last_said: str | None = None
        while not signals.stop:
            now = time.monotonic()
            self._ping(now)
            try:
                if idle or now - last_scan >= SCAN_EVERY:
                    last_scan = now
                    drainer.source.look_for_input()
                if now - last_sweep >= SWEEP_EVERY:
                    last_sweep = now
                    drainer.source.clean_up()
                began = time.perf_counter()
                done = drainer.step()
            except Exception as exc:  # noqa: BLE001 - the loop outlives anything one input or one disk does
                self.metrics.errors.labels(kind="write" if isinstance(exc, OSError) else "batch").inc()
                full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
                self.disk_full = full
                if isinstance(exc, OSError):
                    failure = describe(exc) + (f" (errno {exc.errno})" if exc.errno else "")
                    what = "write failed, entries wait in the spool or the journal"
                else:
                    failure = describe(exc)
                    what = "a batch failed; its items are retried one at a time and a culprit is set aside"
                    say("".join(traceback.format_exception(exc)).rstrip())
                # A full disk is looked at every second (a statvfs): writing resumes soon after space returns.
                backoff = min(DISK_FULL_RETRY if full else BACKOFF_MAX, max(0.5, backoff * 2))
                if not full or failure != last_said:  # a full disk is said once, not every second
                    say(f"{what}; retrying in {backoff:.1f}s: {failure}")
                last_said = failure
                self._report(now, 0, drainer)  # `apilogd status` tells why nothing moves
                signals.sleep(backoff)
                continue
            backoff = 0.0
            self.disk_full = False
            last_said = None
            written = done - drainer.quarantined  # set-aside items are items of the batch, not entries written
            if done:
                self.metrics.batch(written, time.perf_counter() - began)
            self.metrics.quarantined.inc(drainer.quarantined)
            drainer.quarantined = 0
            self._report(now, written, drainer)
            if failure is not None:
                drainer.notes.append(internal("recovered from a write error", {"error": failure}))
                say(f"recovered from: {failure}")
                failure = None
            if archiver is not None:
                archiver.after_batch()
                self._archive(drainer, archiver)
            elif self.signals.archive:  # `apilog archive` asked a host that writes no files
                self.signals.archive = False
                answer_archive_request(drainer.folders.state, 0, [])
            idle = done == 0
            if idle:
                # A producer's append ends the wait; the watchdog is fed on time whatever the wait.
                signals.sleep(min(idle_wait, self.watchdog_every or idle_wait), drainer.source.wakeup)
                idle_wait = min(IDLE_WAIT_MAX if drainer.source.wakeup is None else IDLE_WAIT_WOKEN_MAX,
                                idle_wait * 1.5)
            else:
                idle_wait = IDLE_WAIT
                if done < LINGER_BELOW:
                    signals.sleep(LINGER)  # let a trickle gather: a batch (and its fdatasync) per few entries costs

    @staticmethod
    def _last_notes(drainer: Drainer, archiver: Archiver | None) -> None:
        """Write the INTERNAL notes still waiting (a recovery, a quarantine) before exiting, and seal and switch to
        its .gz each archive the compressor finished (a .gz.tmp never handed over is removed at the next start)."""
        if archiver is not None:
            archiver.close()  # the compression in hand is finished and handed over; the queued ones wait
        if drainer.notes or archiver is not None:
            try:
                drainer.step(only_notes=True)
            except Exception as exc:  # noqa: BLE001 - stopping all the same; the cause is on stderr
                say(f"could not write {len(drainer.notes)} INTERNAL notes and the last archive changes before stopping: "
                    f"{describe(exc)}")

    def _ping(self, now: float) -> None:
        if self.watchdog_every is not None and now - self.last_ping >= self.watchdog_every:
            notify("WATCHDOG=1")
            self.last_ping = now

    def _report(self, now: float, written: int, drainer: Drainer) -> None:
        """Every few seconds: a STATUS= line for systemctl, state/stats.json for `apilogd status`, the metrics file."""
        if written:
            self.written.append((now, written))
        while self.written and self.written[0][0] < now - 60:
            self.written.popleft()
        if now - self.last_report < REPORT_EVERY:
            return
        self.last_report = now
        last_minute = sum(n for _, n in self.written)
        waiting = drainer.source.waiting_bytes()
        limits = self._limits(drainer, waiting)
        self._refresh_metrics(last_minute, waiting, drainer)
        backlog = "" if waiting is None else f"; {waiting} bytes waiting in the spool"
        notify(f"STATUS=wrote {last_minute} entries in the last minute{backlog}")
        stats: dict[str, object] = {"pid": os.getpid(), "written_last_minute": last_minute, "updated": time.time(),
                                    "limits": limits}
        if isinstance(drainer, Forwarder):
            stats["broker_error"] = drainer.last_error
        owned = getattr(drainer.source, "owned", None)
        if owned is not None:
            stats["owned_shards"] = owned()
        try:
            drainer.folders.state.write_atomic(STATS_NAME, json.dumps(stats).encode(), durable=False)
            self.stats_failed = False
        except OSError as exc:
            if not self.stats_failed:  # `apilogd status` only loses its rate; said once, not every 2 s
                say(f"cannot update {STATS_NAME}: {describe(exc)}")
            self.stats_failed = True

    def _limits(self, drainer: Drainer, waiting: int | None) -> dict[str, object]:
        """Who is limited now, what was dropped, how full the disks are: for status, and the metrics."""
        notes = drainer.drop_notes
        if self.settings.drains_spool:
            notes.recount(waiting)  # the producers' spool budget is checked against what really waits
        report: dict[str, object] = {"log_disk_full": self.disk_full, **notes.report()}
        if isinstance(drainer, BatchWriter):
            report.update(drainer.budget.report(), log_disk_full=self.disk_full or drainer.budget.full)
        for reason, total in notes.totals.items():
            self.metrics.suppressed.labels(reason=reason).inc(total - self.suppressed_counted.get(reason, 0))
            self.suppressed_counted[reason] = total
        self.metrics.log_disk_full.set(1 if report["log_disk_full"] else 0)
        return report

    def _refresh_metrics(self, last_minute: int, waiting: int | None, drainer: Drainer) -> None:
        """The textfile for node_exporter, every report; a failure is said once, like stats.json's."""
        metrics = self.metrics
        metrics.written_last_minute.set(last_minute)
        if waiting is not None:
            conf = self.settings
            metrics.backlog(waiting, lambda: waiting_entries(conf.spool_dir, drainer.ledger.offsets)[0])
        try:
            metrics.write()
        except OSError as exc:
            if not self.metrics_failed:
                say(f"cannot update {metrics.path}: {describe(exc)}")
            self.metrics_failed = True
        else:
            self.metrics_failed = False

    def _archive(self, drainer: Drainer, archiver: Archiver) -> None:
        """Rotate what is due (between batches, so no batch is split), and pass on the archiver's reports."""
        try:
            if self.signals.archive:
                self.signals.archive = False
                rotated, failed = archiver.rotate_all()
                answer_archive_request(drainer.folders.state, rotated, failed)
            else:
                rotated = archiver.tick()
            self.metrics.rotations.inc(rotated)
        except Exception as exc:  # noqa: BLE001 - rotation waits for the next tick; writing goes on
            self.metrics.errors.labels(kind="rotation").inc()
            say(f"rotation failed, will retry: {describe(exc)}")
            archiver.notes.append(("rotation failed, will retry", {"error": describe(exc)}))
        while archiver.notes:
            heading, body = archiver.notes.pop(0)
            drainer.notes.append(internal(heading, body))
