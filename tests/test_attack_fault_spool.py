"""Fault injection from the spool side (docs/reference.md, D2, D7, D8), through a real apilogd.

Each test plays a producer (the app's group may add records and owns the segments it writes) or
a forger of CRC-valid records, and checks that the daemon still writes every entry once and keeps
serving every other user.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from apilog import logger, settings
from apilog.core import wire as wire_format
from apilog.spool.frame import frame

from .utils import Daemon, record, segment, wait_for, wait_written


def _forged(**fields: object) -> bytes:
    """A CRC-valid spool record carrying an entry wire with `fields` overriding sane defaults."""
    wire = {"v": 1, "id": str(uuid.uuid4()), "ts": 1700000000.0, "streams": ["INFO"], "location": "kim",
            "message": "m", "heading": None, "dict_to_string": False, "timestamp": False}
    wire.update(fields)
    return frame(wire_format.encode(wire))


def test_a_producer_truncating_its_own_segment_does_not_stop_the_daemon_for_everyone(
        home: Path, tmp_path: Path) -> None:
    """A producer's segment, partly drained, is cut short by its owner (or loses its tail in a power cut
    with APILOG_FSYNC=batch, where segments are not fsynced but the ledger is).

    Found: at the next start the committed offset is "past the end" of the segment, so the whole
    ledger is declared damaged and set aside: `apilogd run` exits 78 for everyone, and no user's
    entry is written until an admin runs `apilogd repair`. One bad segment stops the daemon (D7),
    and a member of the app's group, who owns the segment, has in effect damaged apilogd's state (D8).
    """
    fd = segment(home, "555-evil.00000001.seg")  # a live producer's segment
    os.write(fd, record("INFO", "eve", "e1") + record("INFO", "eve", "e2"))
    first = Daemon(tmp_path)
    try:
        assert first.ready()
        wait_written()
    finally:
        assert first.stop() == 0
    os.ftruncate(fd, 10)  # the owner cuts its own segment short
    logger.delay("INFO", "bob", "innocent", timestamp=False)
    second = Daemon(tmp_path)
    try:
        ready = second.ready(15)
        if ready:
            wait_written(10)
    finally:
        second.stop()
        os.close(fd)
    assert ready, f"one producer's segment stopped apilogd for every user: {second.stderr.strip()}"
    assert (home / "logs/users/bob/INFO.log").read_text() == "INFO:  innocent\n"


def test_a_record_naming_one_stream_many_times_is_written_once(daemon: Path) -> None:
    """A CRC-valid record whose streams list repeats INFO (delay() dedupes, a forger need not).

    Found: route() writes one line per list item, so the entry appears three times in
    users/kim/INFO.log (D2: exactly once in each of its stream files). With a 16 MB record the
    same trick writes one entry ~2 million times.
    """
    fd = segment(daemon, "600-dup.00000001.seg")
    os.write(fd, _forged(streams=["INFO", "INFO", "INFO"], message="only once") + record("INFO", "kim", "after"))
    os.close(fd)
    log = daemon / "logs/users/kim/INFO.log"
    wait_for(lambda: log.exists() and "after" in log.read_text(), what="the record after the forged one")
    assert log.read_text().count("only once") == 1, log.read_text()


def test_sigterm_is_honoured_within_10s_while_a_forged_record_renders(home: Path, tmp_path: Path) -> None:
    """A 2.7 MB record: one million backslashes, streams = ["INFO"] * 100.

    Found: the batch is rendered whole (100 x 1M escapes) before the loop looks at SIGTERM again;
    apilogd exits only ~17 s after SIGTERM, and meanwhile writes 200 MB for one entry. Longer
    repeats make it render for hours (no crash, so the crash probe never sets it aside) while
    every other user waits.
    """
    daemon = Daemon(tmp_path)
    assert daemon.ready()
    fd = segment(home, "601-slow.00000001.seg")
    os.write(fd, _forged(streams=["INFO"] * 100, message="\\" * 1_000_000))
    os.close(fd)
    time.sleep(1.5)  # inside the batch that holds it
    asked = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        daemon.proc.wait(10)
    took = time.monotonic() - asked
    daemon.stop()
    assert took < 10, f"apilogd took {took:.1f}s to honour SIGTERM"


def test_jsonl_lines_stay_strict_json_whatever_a_record_carries(home: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """APILOG_FORMAT=jsonl; a CRC-valid record whose message holds NaN and -Infinity (Python's json reads them).

    Found (minor): the daemon writes `"message":{"a":NaN,"b":-Infinity}` into users/kim/INFO.jsonl, a
    line that strict JSON readers (jq, JSON.parse, Go, Rust) reject. delay() itself turns such
    floats into strings, so only a forged record gets there.
    """
    monkeypatch.setenv("APILOG_FORMAT", "jsonl")
    settings.reset()
    fd = segment(home, "602-nan.00000001.seg")
    os.write(fd, _forged(message={"a": float("nan"), "b": float("-inf")}))
    os.close(fd)
    daemon = Daemon(tmp_path)
    try:
        assert daemon.ready()
        wait_written()
    finally:
        daemon.stop()

    def strict(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    written = home / "logs/users/kim/INFO.jsonl"
    for line in (written.read_text().splitlines() if written.exists() else []):
        json.loads(line, parse_constant=strict)
    internal = (home / "logs/system/INTERNAL.jsonl").read_text()
    assert "quarantined spool message" in internal or written.exists()  # refused and reported, or strict JSON
