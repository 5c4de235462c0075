"""Managing a background apilogd: start it and wait for READY, stop it and wait for the exit, report status."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from apilog import _message
from apilog._atomic import write_atomic
from apilog._entry import Entry
from apilog.settings import Settings
from apilog.spool import layout
from apilog.spool.ledger import read_offsets
from apilog.spool.reader import waiting

from ._instance import InstanceLock, running_pid
from .exceptions import DaemonError, StartFailed, StopFailed

STATS_NAME = "stats.json"
ARCHIVE_REQUEST = "archive.request"
ARCHIVE_DONE = "archive.done"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
OUTPUT_NAME = "apilogd.out"


def start(settings: Settings) -> tuple[int, bool]:
    """Run `apilogd run` in the background; return its pid and whether it was started now."""
    pid = running_pid(settings.home)
    if pid is not None:
        return pid, False
    settings.home.mkdir(parents=True, exist_ok=True)
    output = settings.home / OUTPUT_NAME
    with tempfile.TemporaryDirectory() as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        # The daemon reports readiness to us exactly as it would to systemd.
        sock.bind(f"{tmp}/notify")
        sock.settimeout(0.1)
        env = {**os.environ, "NOTIFY_SOCKET": f"{tmp}/notify"}
        with output.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "apilogd", "run"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if b"READY=1" in sock.recv(4096):
                    return proc.pid, True
            except TimeoutError:
                pass
            if proc.poll() is not None:
                raise StartFailed(f"apilogd exited with status {proc.returncode}: {_tail(output)}")
        proc.terminate()
        raise StartFailed(f"apilogd was not ready within {START_TIMEOUT:.0f}s: {_tail(output)}")


def stop(settings: Settings, timeout: float = STOP_TIMEOUT) -> int | None:
    """Ask the running daemon to stop and wait for its exit; return its pid, or None if none ran."""
    pid = running_pid(settings.home)
    deadline = time.monotonic() + timeout
    while pid == -1 and time.monotonic() < deadline:  # starting: its pidfile is moments away
        time.sleep(0.05)
        pid = running_pid(settings.home)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    while time.monotonic() < deadline:
        if running_pid(settings.home) is None:
            return pid
        time.sleep(0.05)
    raise StopFailed(f"apilogd (pid {pid}) did not exit within {timeout:.0f}s")


@dataclass(frozen=True)
class Status:
    """What `apilogd status` reports."""

    pid: int | None
    backlog: int | None  # None: the broker could not tell
    oldest_age: float | None
    quarantined: int
    written_last_minute: int | None  # None when the daemon is not running


def _broker_backlog(url: str) -> int | None:
    """Messages waiting in apilog's queue on another broker; None when it cannot be asked."""
    from kombu import Connection  # noqa: PLC0415 - only for a site on another broker

    try:
        with Connection(url, connect_timeout=5) as conn:
            return int(conn.default_channel.queue_declare(queue=_message.QUEUE, passive=True).message_count)
    except Exception:  # an unreachable broker, or no such queue yet: say "unknown", not fail
        return None


def status(settings: Settings) -> Status:
    pid = running_pid(settings.home)
    count: int | None
    count, firsts = waiting(settings.spool_dir, read_offsets(settings.state_dir))
    if settings.broker_url and count == 0:
        count = _broker_backlog(settings.broker_url)
    times = []
    for payload in firsts:
        try:
            times.append(Entry.from_wire(_message.decode(payload)).ts)
        except ValueError:
            continue
    oldest = time.time() - min(times) if times else None
    try:
        quarantined = len(os.listdir(layout(settings.spool_dir)["quarantine"]))
    except FileNotFoundError:
        quarantined = 0
    written = None
    if pid is not None:
        try:
            stats = json.loads((settings.state_dir / STATS_NAME).read_text())
            if stats.get("pid") == pid:
                written = int(stats["written_last_minute"])
        except (FileNotFoundError, ValueError, KeyError):
            pass
    return Status(pid, count, oldest, quarantined, written)


def archive_now(settings: Settings, timeout: float = START_TIMEOUT) -> int:
    """Rotate every live file now; the running daemon does it (one owner), else this process does."""
    from ._archive import Archiver  # noqa: PLC0415 - watchdog is only needed here
    from ._drain import Drainer  # noqa: PLC0415

    pid = running_pid(settings.home)
    if pid is None:
        lock = InstanceLock(settings.home)  # no daemon may start while we rotate
        try:
            drainer = Drainer(settings)
            try:
                drainer.recover()  # never rotate a file holding half a batch
                archiver = Archiver(settings, drainer.tree, drainer.files)
                rotated = archiver.rotate_all()
                archiver.close(wait=True)
            finally:
                drainer.close()
        finally:
            lock.release()
        return rotated
    token = uuid.uuid4().hex
    write_atomic(settings.state_dir / ARCHIVE_REQUEST, token.encode())
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done = json.loads((settings.state_dir / ARCHIVE_DONE).read_text())
            if done.get("token") == token:
                return int(done["rotated"])
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    raise DaemonError(f"apilogd (pid {pid}) did not rotate within {timeout:.0f}s")


def answer_archive_request(settings: Settings, rotated: int) -> None:
    """Tell the waiting `apilog archive` how many files the daemon rotated for it."""
    try:
        token = (settings.state_dir / ARCHIVE_REQUEST).read_text()
    except FileNotFoundError:
        token = ""
    write_atomic(settings.state_dir / ARCHIVE_DONE, json.dumps({"token": token, "rotated": rotated}).encode())


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) or "no output"
    except OSError:
        return "no output"
