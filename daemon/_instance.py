"""One apilogd per APILOG_HOME: an exclusive lock held for the process's life, and a pidfile beside it."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .exceptions import AlreadyRunning

LOCK_NAME = "apilogd.lock"
PID_NAME = "apilogd.pid"


class InstanceLock:
    """Held by the running daemon; the kernel releases it if the process dies."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.fd = os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            pid = running_pid(home)
            raise AlreadyRunning(f"apilogd is already running for {home} (pid {pid})") from None
        (home / PID_NAME).write_text(f"{os.getpid()}\n")

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.home / PID_NAME).unlink()
        os.close(self.fd)


def running_pid(home: Path) -> int | None:
    """The pid of the daemon holding `home`, or None when none does (a stale pidfile is ignored)."""
    try:
        fd = os.open(home / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it: any pidfile left is stale
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    try:
        return int((home / PID_NAME).read_text().strip())
    except (FileNotFoundError, ValueError):
        return -1  # held, but the pidfile is not written yet
