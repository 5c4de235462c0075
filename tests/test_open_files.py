"""The daemon keeps log files open in a bounded set, not one handle per file ever written."""

from __future__ import annotations

import os
from pathlib import Path

from apilogd.commit.open_files import MAX_OPEN

from apilog import logger

from .utils import log_file, wait_written


def test_handles_stay_bounded(daemon: Path) -> None:
    """Entries for more users than the handle limit all land, and the daemon's open files stay bounded."""
    users = MAX_OPEN + 60
    for n in range(users):
        logger.delay("INFO", f"user{n}", f"entry {n}", timestamp=False)
    for n in range(users):  # a second round reopens the files closed to make room
        logger.delay("INFO", f"user{n}", f"again {n}", timestamp=False)
    wait_written()
    pid = int((daemon / "apilogd.pid").read_text())
    assert len(os.listdir(f"/proc/{pid}/fd")) < MAX_OPEN + 32
    for n in (0, users // 2, users - 1):
        assert log_file(daemon, f"users/user{n}/INFO.log") == f"INFO:  entry {n}\nINFO:  again {n}\n"
