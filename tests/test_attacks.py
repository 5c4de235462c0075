"""Hostile input through a real daemon: names, lines, sizes, odd types, planted links, spool garbage."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from apilog import logger
from apilog.core.entry import CUT_MARKER

from .utils import wait_for, wait_written


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


def _all_text(logs: Path) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in logs.rglob("*") if p.is_file() and not p.is_symlink())


def test_attacks_stay_inside_and_lose_nothing(daemon: Path, tmp_path: Path) -> None:
    """Traversal, NUL, huge and empty names, forged lines, 1 MB, odd types, links and garbage: all contained."""
    logs = daemon / "logs"
    outside = tmp_path / "outside"
    outside.mkdir()
    (logs / "users" / "linked").mkdir(parents=True)
    (logs / "users" / "victim").symlink_to(outside)  # a planted folder link
    (logs / "users" / "linked" / "INFO.log").symlink_to(outside / "target.log")  # a planted file link

    markers: list[str] = []

    def attack(stream: object, location: object, message: object = None, **kw: object) -> None:
        marker = f"M{len(markers):03d}"
        markers.append(marker)
        if isinstance(message, str):
            logger.delay(stream, location, f"{marker} {message}", **kw)
        elif isinstance(message, dict):
            logger.delay(stream, location, {**message, "marker": marker}, **kw)
        else:
            logger.delay(stream, location, message, heading=marker, **kw)

    for user in ("../etc", "../../outside", "/etc/passwd", "a\x00b", "..", ".", "users/../../x", "x" * 1000, "",
                 "victim", "linked", "\u202eevil", "%2E%2E"):
        attack("INFO", user, "traversal attempt")
    for stream in ("../INFO", "INFO/../../x", "/abs", "A\x00B", "", "INFO\nERROR", "x" * 40):
        attack(stream, "bob", "bad stream")
    attack("INFO", "bob", "ok\r\nERROR:  forged\x1b[2J\x1b]0;title\x07")
    attack("WARN", "bob", "body\nINFO:  forged", heading="Head\r\nERROR: forged\x1b[31m")
    attack("ERROR", "bob", {"k\nERROR: forged": "v\r\n", "\x1b": "\x9b"}, dict_to_string=True)
    attack("INFO", "big", "A" * (1 << 20))
    cyclic: dict[str, object] = {"name": "loop"}
    cyclic["self"] = cyclic
    deep: dict[str, object] = {}
    node = deep
    for _ in range(200):
        node["d"] = node = {}
    for odd in (b"\x00\xffbytes", {1, 2}, Unprintable(), [1, "two"], 3.5, None):
        attack("DEBUG", "odd", odd)
    attack("DEBUG", "odd", {(1, 2): "tuple key", 3: "int", None: "none", "nan": math.nan, "inf": -math.inf,
                            "when": datetime(2024, 4, 9, 20, 39, 5), "set": {1}, "bytes": b"\x01"})
    attack("DEBUG", "odd", cyclic, dict_to_string=True)
    attack("DEBUG", "odd", deep)
    (daemon / "spool" / "segments" / "evil.pkl").write_bytes(pickle.dumps(os.system))

    wait_written()
    wait_for(lambda: not (daemon / "spool" / "segments" / "evil.pkl").exists(), what="the pickle to be quarantined")
    wait_written()

    # Nothing outside the tree, nothing through a link.
    assert list(outside.iterdir()) == []
    for path in logs.rglob("*"):
        assert Path(os.path.realpath(path)).is_relative_to(logs) or path.is_symlink()
    text = _all_text(logs)

    # Every entry's content is somewhere: its own file or INTERNAL.
    for marker in markers:
        assert marker in text, marker
    internal = (logs / "system" / "INTERNAL.log").read_text()
    assert "is a symbolic link; not followed" in internal and "not a plain directory; not followed" in internal
    assert "quarantined spool message" in internal

    # Nothing forged, no raw control characters.
    for path in logs.rglob("*.log"):
        if path.is_symlink():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            assert not line.startswith(("ERROR:  forged", "INFO:  forged", "ERROR: forged")), line
            assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line), line
    assert "\x1b" not in text and "\r" not in text

    # The 1 MB message was cut in the caller, visibly, and INTERNAL was told.
    big = (logs / "users" / "big" / "INFO.log").read_text()
    assert len(big) < 70_000 and CUT_MARKER.split("{")[0] in big
    assert "entry cut to" in internal

    # The daemon is still running.
    status = subprocess.run([sys.executable, "-m", "apilogd", "status"], capture_output=True, text=True)
    assert status.returncode == 0


def test_a_burst_of_new_users_is_reported_not_refused(daemon: Path) -> None:
    """More new user folders in a minute than the limit: INTERNAL says so, and every entry is still written."""
    from apilogd.commit.batch import NEW_FOLDERS_PER_MINUTE

    count = NEW_FOLDERS_PER_MINUTE + 100
    for n in range(count):
        logger.delay("INFO", f"flood{n}", "hello", timestamp=False)
    wait_written()
    assert sum(1 for _ in (daemon / "logs" / "users").iterdir()) == count
    wait_for(lambda: "burst of new user folders" in (daemon / "logs" / "system" / "INTERNAL.log").read_text()
             if (daemon / "logs" / "system" / "INTERNAL.log").exists() else False, what="the burst report")
