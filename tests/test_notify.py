"""The systemd notify protocol, read from our own socket: READY=1, STATUS=, WATCHDOG=1, STOPPING=1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from apilog import logger

from .utils import log_file, wait_written


def test_ready_status_watchdog_stopping(home: Path, tmp_path: Path) -> None:
    """READY=1 before an entry is logged; STATUS= and WATCHDOG=1 while running; STOPPING=1 and exit 0 on SIGTERM."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(20)
        env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
        proc = subprocess.Popen([sys.executable, "-m", "apilogd", "run"], env=env)
        try:
            assert sock.recv(4096).decode().startswith("READY=1\nMAINPID=")
            logger.delay("INFO", "mia", "while notified", timestamp=False)
            wait_written()
            time.sleep(2.5)  # long enough for a STATUS= report and a few watchdog pings
            proc.send_signal(signal.SIGTERM)
            seen = []
            while not seen or seen[-1] != "STOPPING=1":
                seen.append(sock.recv(4096).decode())
            assert proc.wait(timeout=10) == 0
        finally:
            proc.kill()
    assert any(s.startswith("STATUS=wrote 1 entries in the last minute") for s in seen), seen
    assert seen.count("WATCHDOG=1") >= 2
    assert log_file(home, "users/mia/INFO.log") == "INFO:  while notified\n"


def test_a_listener_that_stops_reading_never_stalls_the_daemon(home: Path, tmp_path: Path) -> None:
    """With the notify socket's queue full, apilogd still drains and still exits promptly on SIGTERM."""
    path = str(tmp_path / "deaf.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as filler:
            filler.connect(path)
            try:
                while True:
                    filler.send(b"x")  # fill the listener's queue, as a stuck manager would leave it
            except BlockingIOError:
                pass
        proc = subprocess.Popen([sys.executable, "-m", "apilogd", "run"], env={**os.environ, "NOTIFY_SOCKET": path})
        try:
            logger.delay("INFO", "deaf", "still written", timestamp=False)
            wait_written()
            begun = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            assert time.monotonic() - begun < 10
        finally:
            proc.kill()
    assert log_file(home, "users/deaf/INFO.log") == "INFO:  still written\n"
