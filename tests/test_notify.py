"""The systemd notify protocol, read from our own socket: READY=1 once consuming, STOPPING=1 on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from apilog import logger

from .conftest import log_file, wait_written


def test_ready_then_stopping(home: Path, tmp_path: Path) -> None:
    """READY=1 arrives before an entry is logged; after SIGTERM, STOPPING=1 and exit 0, entry written."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(20)
        proc = subprocess.Popen([sys.executable, "-m", "apilogd", "run"], env={**os.environ, "NOTIFY_SOCKET": path})
        try:
            assert sock.recv(4096).decode().startswith("READY=1")
            logger.delay("INFO", "mia", "while notified", timestamp=False)
            wait_written()
            proc.send_signal(signal.SIGTERM)
            assert sock.recv(4096) == b"STOPPING=1"
            assert proc.wait(timeout=10) == 0
        finally:
            proc.kill()
    assert log_file(home, "users/mia/INFO.log") == "INFO:  while notified\n"
