"""Managing a background apilogd: start it and wait for READY, stop it and wait for the exit, report status."""

from __future__ import annotations

import contextlib
import dataclasses
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
from typing import Any

from apilog.core import wire
from apilog.core.atomic import write_atomic
from apilog.core.folder import Folder, UnsafePath
from apilog.core.shards import broker_kind, queue_name
from apilog.settings import Settings
from apilog.spool import layout
from apilog.spool.backlog import committed_offsets, waiting

from ..exceptions import DaemonError, StartFailed, StopFailed, UnsafeSetup
from ..state.folders import open_folders, open_home
from .instance import (
    FILE_MODE,
    ForeignHolder,
    InstanceLock,
    lock_holder,
    output_tail,
    running_pid,
)

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
    # Home is made 0750 whatever the umask; apilogd.out is opened inside it, never through a planted link.
    try:
        with open_home(settings) as home:
            out = home.open_plain(OUTPUT_NAME, os.O_RDWR | os.O_APPEND, FILE_MODE)
    except UnsafePath as exc:
        raise UnsafeSetup(str(exc)) from None
    try:
        with tempfile.TemporaryDirectory() as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # The daemon reports readiness to us exactly as it would to systemd.
            sock.bind(f"{tmp}/notify")
            sock.settimeout(0.1)
            env = {**os.environ, "NOTIFY_SOCKET": f"{tmp}/notify"}
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
                    raise StartFailed(f"apilogd exited with status {proc.returncode}: {output_tail(out)}")
            proc.terminate()
            raise StartFailed(f"apilogd was not ready within {START_TIMEOUT:.0f}s: {output_tail(out)}")
    finally:
        os.close(out)


def stop(settings: Settings, timeout: float = STOP_TIMEOUT) -> int | None:
    """Ask the running daemon to stop and wait for its exit; return its pid, or None if none ran.

    Only the apilogd that the kernel names as the instance lock's holder is signalled, through a
    pidfd (docs/reference.md, D8); the pidfile never decides it.
    """
    try:
        holder = lock_holder(settings.home)
    except ForeignHolder as exc:
        raise ForeignHolder(f"{exc}; nothing was signalled") from None
    if holder is None:
        return None
    with holder:
        holder.signal(signal.SIGTERM)  # False: it exited meanwhile, which the wait sees at once
        if holder.wait(timeout):
            return holder.pid
    raise StopFailed(f"apilogd (pid {holder.pid}) did not exit within {timeout:.0f}s")


@dataclass(frozen=True)
class Status:
    """What `apilogd status` reports."""

    pid: int | None
    backlog: int | None  # None: the broker could not tell
    oldest_age: float | None
    quarantined: int
    written_last_minute: int | None  # None when the daemon is not running
    owned_shards: list[int] | None = None  # a writer's shards it holds now (the rest it stands by for)
    broker_error: str | None = None  # a forwarder's last failure to publish, while it retries
    limits: dict[str, Any] | None = None  # who is limited now, what was dropped, how full the log disk is


def _broker_backlog(url: str, shards: frozenset[int]) -> int | None:
    """Messages waiting in a writer's shard queues on the broker; None when it cannot be asked."""
    from kombu import Connection  # only for a site on another broker

    try:
        with Connection(url, connect_timeout=5) as conn:
            return sum(int(conn.default_channel.queue_declare(queue=queue_name(k), passive=True).message_count)
                       for k in shards)
    except Exception:  # noqa: BLE001 - an unreachable broker, or no such queue yet: say "unknown", not fail
        return None


def durability_warning(settings: Settings) -> str | None:
    """Why the site's broker could lose entries it acknowledged (Redis without appendfsync always), or None."""
    if settings.role == "local" or broker_kind(settings.broker_url) != "redis":
        return None
    from ..sources.redis import client
    from ..sources.redis import durability_warning as redis_warning

    conn = client(settings.broker_url or "")
    try:
        return redis_warning(conn)
    finally:
        conn.close()


def status(settings: Settings) -> Status:
    pid = running_pid(settings.home)
    count: int | None
    count, firsts = waiting(settings.spool_dir, committed_offsets(settings.state_dir))
    if settings.role == "write" and settings.broker_url:
        count = _broker_backlog(settings.broker_url, settings.writer_shards)
    times = []
    for payload in firsts:
        try:
            times.append(wire.decode(payload).ts)
        except Exception:  # noqa: BLE001, S112 - a bad record is the daemon's to quarantine, not status's to fail on
            continue
    oldest = time.time() - min(times) if times else None
    try:
        quarantined = len(os.listdir(layout(settings.spool_dir)["quarantine"]))
    except OSError:  # none yet, or not ours to read
        quarantined = 0
    found = Status(pid, count, oldest, quarantined, None)
    if pid is not None:
        try:
            stats = json.loads((settings.state_dir / STATS_NAME).read_text())
            if stats.get("pid") == pid:
                limits = stats.get("limits")
                found = dataclasses.replace(found, written_last_minute=int(stats["written_last_minute"]),
                                            owned_shards=stats.get("owned_shards"), broker_error=stats.get("broker_error"),
                                            limits=limits if isinstance(limits, dict) else None)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return found


def archive_now(settings: Settings, timeout: float = START_TIMEOUT) -> tuple[int, list[str]]:
    """Rotate every live file now; the running daemon does it (one owner), else this process does.

    Returns how many files were rotated and, for each one that could not be, its path and why.
    """
    from ..archive.archiver import Archiver  # watchdog is only needed here
    from ..commit.batch import BatchWriter

    holder = lock_holder(settings.home)
    if holder is None:
        with contextlib.ExitStack() as stack:
            home = stack.enter_context(open_home(settings))
            stack.callback(InstanceLock(home).release)  # no daemon may start while we rotate
            folders = open_folders(settings, home)
            stack.callback(folders.close)
            writer = BatchWriter(settings, folders)  # redoes what the journal holds: no half batch is rotated
            stack.callback(writer.close)
            archiver = Archiver(settings, writer)
            result = archiver.rotate_all()
            archiver.close(wait=True)
            writer.step(only_notes=True)  # seals the compressions and switches each archive to its .gz
            writer.checkpoint()
        return result
    with holder:
        token = uuid.uuid4().hex
        write_atomic(settings.state_dir / ARCHIVE_REQUEST, token.encode())
        holder.signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done = json.loads((settings.state_dir / ARCHIVE_DONE).read_text())
                if done.get("token") == token:
                    return int(done["rotated"]), [str(f) for f in done.get("failed", [])]
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.05)
    raise DaemonError(f"apilogd (pid {holder.pid}) did not rotate within {timeout:.0f}s")


def answer_archive_request(state: Folder, rotated: int, failed: list[str]) -> None:
    """Tell the waiting `apilog archive` how many files the daemon rotated for it, and which it could not."""
    try:
        token = state.read(ARCHIVE_REQUEST, 1024).decode("ascii", "replace")
    except FileNotFoundError:
        token = ""
    state.write_atomic(ARCHIVE_DONE, json.dumps({"token": token, "rotated": rotated, "failed": failed}).encode())

