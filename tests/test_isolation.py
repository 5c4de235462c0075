"""docs/reference.md through a real apilogd: one bad record, spool entry, target file, state file or disk never stops the rest."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apilog import logger, settings
from apilog.core import wire
from apilog.spool.frame import HEADER, frame

from .utils import Daemon, log_file, record, segment, wait_for, wait_written

APILOGD = [sys.executable, "-m", "apilogd"]
DEEP = b"[" * 100_000 + b"]" * 100_000


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APILOGD, *args], capture_output=True, text=True, timeout=60)


def _internal(home: Path) -> str:
    path = home / "logs" / "system" / "INTERNAL.log"
    return path.read_text() if path.exists() else ""


def _with_body(body: bytes) -> bytes:
    """A well-formed stored message whose base64 body is `body`."""
    message = json.loads(record("INFO", "x", "template")[HEADER.size:])
    message["body"] = base64.b64encode(body).decode()
    return frame(json.dumps(message).encode())


def test_poison_records_are_quarantined_and_the_rest_flows(daemon: Path) -> None:
    """JSON nested 100,000 deep (as the message, or in its body) is quarantined; the records around it are written."""
    fd = segment(daemon, "900-poison.00000001.seg")
    os.write(fd, record("INFO", "ana", "a1") + frame(DEEP) + record("INFO", "ana", "a2")
             + _with_body(DEEP) + record("INFO", "ana", "a3"))
    os.close(fd)
    log = daemon / "logs" / "users" / "ana" / "INFO.log"
    wait_for(lambda: log.exists() and "a3" in log.read_text(), what="the records after the poison")
    assert log_file(daemon, "users/ana/INFO.log") == "INFO:  a1\nINFO:  a2\nINFO:  a3\n"
    wait_for(lambda: _internal(daemon).count("quarantined spool message") == 2, what="two quarantine reports")
    reasons = [line for line in _internal(daemon).splitlines() if "quarantined spool message:" in line]
    assert len(reasons) == 2 and all("not an apilog task message" in r or "body is not" in r for r in reasons), reasons
    assert len(list((daemon / "spool" / "quarantine").iterdir())) == 2
    status = _cli("status")
    assert status.returncode == 0 and "Traceback" not in status.stderr


def test_spool_entries_that_are_not_segments_are_set_aside(daemon: Path, tmp_path: Path) -> None:
    """A folder, FIFO, socket, symlink or hard link among the segments is never read, reported once, blocks nothing."""
    segments = daemon / "spool" / "segments"
    secret = tmp_path / "secret.seg"
    secret.write_bytes(record("INFO", "eve", "secret through a link"))
    linked = tmp_path / "linked.seg"
    linked.write_bytes(record("INFO", "eve", "secret through a hard link"))
    before = secret.read_bytes(), linked.read_bytes()
    (segments / "d-folder.00000001.seg").mkdir()
    os.mkfifo(segments / "f-fifo.00000001.seg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(segments / "s-sock.00000001.seg"))
    (segments / "l-link.00000001.seg").symlink_to(secret)
    os.link(linked, segments / "h-hard.00000001.seg")
    long_name = "g" * 250
    (segments / long_name).write_bytes(b"garbage with a very long name")
    try:
        logger.delay("INFO", "fay", "still flows", timestamp=False)
        wait_written()
        wait_for(lambda: (daemon / "logs/users/fay/INFO.log").exists(), what="the good entry")
        assert log_file(daemon, "users/fay/INFO.log") == "INFO:  still flows\n"
        wait_for(lambda: _internal(daemon).count("set aside a spool entry that is not a segment") == 5,
                 what="five reports")
        wait_for(lambda: not (segments / long_name).exists(), what="the long-named garbage to be quarantined")
        time.sleep(1.5)  # several scans later: still reported once each
        internal = _internal(daemon)
        assert internal.count("set aside a spool entry that is not a segment") == 5
        assert "a symbolic link" in internal and "not a regular file" in internal and "2 links" in internal
        assert not (daemon / "logs" / "users" / "eve").exists()
        assert (secret.read_bytes(), linked.read_bytes()) == before
        assert (segments / "h-hard.00000001.seg").exists()
        assert all(len(p.name.encode()) <= 255 for p in (daemon / "spool" / "quarantine").iterdir())
        assert "garbage with a very long name" in "".join(
            p.read_text(errors="replace") for p in (daemon / "spool" / "quarantine").iterdir())
        status = _cli("status")
        assert status.returncode == 0 and "Traceback" not in status.stderr + status.stdout
    finally:
        server.close()


@contextlib.contextmanager
def _immutable(path: Path) -> Iterator[bool]:
    """chattr +i: not even root may open the file for writing (EPERM); False where the filesystem cannot."""
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        yield done
    finally:
        if done:
            subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_target_that_cannot_be_opened_goes_to_internal(daemon: Path) -> None:
    """A user's file that is a folder, or immutable, sends its entries (content kept) to INTERNAL; others are written."""
    users = daemon / "logs" / "users"
    (users / "bob" / "INFO.log").mkdir(parents=True)
    (users / "carl").mkdir(parents=True)
    (users / "carl" / "INFO.log").write_text("INFO:  before\n")
    with _immutable(users / "carl" / "INFO.log") as immutable:
        logger.delay("INFO", "bob", "for bob's folder", timestamp=False)
        logger.delay("INFO", "carl", "for carl's locked file", timestamp=False)
        logger.delay("INFO", "dan", "for dan", timestamp=False)
        wait_written()
        wait_for(lambda: (users / "dan" / "INFO.log").exists(), what="dan's entry")
        assert log_file(daemon, "users/dan/INFO.log") == "INFO:  for dan\n"
        internal = _internal(daemon)
        assert "cannot write users/bob/INFO.log" in internal and "for bob's folder" in internal
        if immutable:
            assert "cannot write users/carl/INFO.log" in internal and "for carl's locked file" in internal
    assert (users / "carl" / "INFO.log").read_text() == "INFO:  before\n"


def _probe_names(home: Path, key: str, crashes: int) -> bool:
    """state/probe says the daemon is handling `key`, which crashed it `crashes` times before."""
    try:
        return (home / "state" / "probe").read_text() == f"{crashes}\n{key}\n"
    except FileNotFoundError:
        return False


def test_a_record_that_kills_the_daemon_is_set_aside_after_its_second_crash(home: Path, tmp_path: Path) -> None:
    """A record during which apilogd dies, again and again, is quarantined unread at the third start; the rest lands once."""
    # Rendering it takes long enough to be caught in the act (a producer's own size limit does not bind a forger).
    slow = record("INFO", "gil", "\\" * 3_000_000, max_entry_bytes=1 << 24)
    first = record("INFO", "gil", "before")
    fd = segment(home, "800-killer.00000001.seg")
    os.write(fd, first + slow + record("INFO", "gil", "after"))
    os.close(fd)
    key = f"800-killer.00000001.seg@{len(first)}"
    env = {**os.environ, "APILOG_MAX_ENTRY_BYTES": str(1 << 24)}  # so the daemon does not cut it short

    crashed = Daemon(tmp_path, env=env)
    assert crashed.ready()
    time.sleep(0.2)  # inside the batch that holds the slow record
    crashed.kill()
    for crashes in (0, 1):  # now probed: each start names the record before it is handled
        again = Daemon(tmp_path, env=env)
        assert again.ready()
        wait_for(lambda n=crashes: _probe_names(home, key, n), what=f"the probe to name the record ({crashes} crashes)")
        again.kill()
    survivor = Daemon(tmp_path, env=env)
    try:
        assert survivor.ready()
        wait_written()
        wait_for(lambda: "crashed apilogd 2 times" in _internal(home), what="the record to be set aside")
    finally:
        assert survivor.stop() == 0
    assert log_file(home, "users/gil/INFO.log") == "INFO:  before\nINFO:  after\n"
    [aside] = (home / "spool" / "quarantine").glob(f"800-killer.00000001.seg.*.{len(first)}.msg")
    assert aside.stat().st_size > 3_000_000


def _entries_in(path: Path) -> list[str]:
    """The messages of the records in a quarantined copy of a segment."""
    data, pos, out = path.read_bytes(), 0, []
    while pos + HEADER.size <= len(data):
        _, length, _ = HEADER.unpack_from(data, pos)
        out.append(wire.decode(data[pos + HEADER.size: pos + HEADER.size + length]).message)
        pos += HEADER.size + length
    return out


DAMAGE = {
    "empty": lambda ledger: b"",
    "garbage": lambda ledger: b"\x00\xff{{{ not json",
    "wrong shape": lambda ledger: b"[1, 2, 3]",
    "negative offset": lambda ledger: json.dumps(
        {**ledger, "offsets": dict.fromkeys(ledger["offsets"], -5)}).encode(),
    "dot-dot in a pending path": lambda ledger: json.dumps(
        {**ledger, "pending": {"files": {"users/../../etc/passwd": 0}, "offsets": ledger["offsets"]}}).encode(),
}


def _half_drained() -> None:
    """e0-e9 written by a daemon now stopped; e10-e14 waiting in the same, still open, segment."""
    for n in range(10):
        logger.delay("INFO", "lia", f"e{n}", timestamp=False)
    assert _cli("start").returncode == 0
    wait_written()
    assert _cli("stop").returncode == 0
    for n in range(10, 15):
        logger.delay("INFO", "lia", f"e{n}", timestamp=False)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_ledger_stops_cleanly_and_repair_loses_and_doubles_nothing(home: Path, damage: str) -> None:
    """A damaged ledger: one line naming it and `apilogd repair`, exit 78 every start until repaired; then each entry once."""
    _half_drained()
    ledger_path = home / "state" / "ledger.json"
    ledger_path.write_bytes(DAMAGE[damage](json.loads(ledger_path.read_bytes())))

    for _ in range(2):  # the refusal holds across restarts: no silent fresh start
        run = _cli("run")
        assert run.returncode == 78, run.stderr
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "ledger.json" in run.stderr and "apilogd repair" in run.stderr
    assert not ledger_path.exists()
    assert log_file(home, "users/lia/INFO.log") == "".join(f"INFO:  e{n}\n" for n in range(10))

    repaired = _cli("repair")
    assert repaired.returncode == 0, repaired.stderr
    assert _cli("start").returncode == 0
    try:
        wait_written()
        wait_for(lambda: "apilogd repair rebuilt a damaged ledger" in _internal(home), what="repair's report")
    finally:
        _cli("stop")
    written = [line.removeprefix("INFO:  ") for line in log_file(home, "users/lia/INFO.log").splitlines()]
    aside = {m for p in (home / "spool" / "quarantine").glob("repair.*") for m in _entries_in(p)}
    assert len(written) == len(set(written))  # none doubled
    assert written[:10] == [f"e{n}" for n in range(10)]
    assert {f"e{n}" for n in range(15)} <= set(written) | aside  # none lost: what repair could not place is aside


@pytest.mark.parametrize("shift", [10_000, -7], ids=["past the end", "inside a record"])
def test_an_offset_that_no_longer_fits_its_segment_sets_that_segment_aside(home: Path, shift: int) -> None:
    """A committed offset past its segment's end or inside a record: that segment's records go to quarantine, once."""
    _half_drained()
    ledger_path = home / "state" / "ledger.json"
    ledger = json.loads(ledger_path.read_bytes())
    ledger_path.write_text(json.dumps({**ledger, "offsets": {k: v + shift for k, v in ledger["offsets"].items()}}))
    assert _cli("start").returncode == 0
    try:
        wait_written()
        wait_for(lambda: "set aside a segment whose committed offset" in _internal(home), what="the report")
    finally:
        _cli("stop")
    written = [line.removeprefix("INFO:  ") for line in log_file(home, "users/lia/INFO.log").splitlines()]
    aside = [m for p in (home / "spool" / "quarantine").glob("doubtful.*") for m in _entries_in(p)]
    assert written == [f"e{n}" for n in range(10)]  # nothing written twice
    assert sorted(aside) == sorted(f"e{n}" for n in range(15))  # none lost: the segment's records are all kept


def test_stats_that_cannot_be_saved_do_not_stop_the_daemon(home: Path, tmp_path: Path) -> None:
    """state/stats.json that cannot be replaced: said once on stderr; entries keep being written."""
    (home / "state").mkdir(parents=True)
    (home / "state" / "stats.json").mkdir()
    daemon = Daemon(tmp_path)
    try:
        assert daemon.ready()
        for n in range(3):
            logger.delay("INFO", "max", f"n{n}", timestamp=False)
            time.sleep(1.2)  # across a few status reports
        wait_written()
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0
    assert log_file(home, "users/max/INFO.log") == "INFO:  n0\nINFO:  n1\nINFO:  n2\n"
    assert daemon.stderr.count("cannot update stats.json") == 1 and "Traceback" not in daemon.stderr


def _make_read_only(mount: Path) -> None:
    """An ext4 error, as a failing disk raises it: the file system turns read-only under the daemon."""
    device = os.path.basename(os.path.realpath(subprocess.run(
        ["findmnt", "-no", "SOURCE", str(mount)], capture_output=True, text=True, check=True).stdout.strip()))
    Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("apilog test")


def test_a_log_disk_gone_read_only_keeps_entries_and_stops_cleanly(home: Path, tmp_path: Path, small_disk: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """EROFS while running and at SIGTERM: the entry waits in the spool, the daemon exits 0 without a traceback."""
    monkeypatch.setenv("APILOG_LOG_DIR", str(small_disk))
    settings.reset()
    daemon = Daemon(tmp_path)
    try:
        assert daemon.ready()
        logger.delay("INFO", "nia", "before", timestamp=False)
        wait_written()
        _make_read_only(small_disk)
        logger.delay("INFO", "nia", "after", timestamp=False)
        wait_for(lambda: "Read-only file system" in daemon.stderr, what="the write failure to be reported")
    finally:
        code = daemon.stop()
    assert code == 0 and "Traceback" not in daemon.stderr, daemon.stderr
    assert (small_disk / "users" / "nia" / "INFO.log").read_text() == "INFO:  before\n"
    status = _cli("status")
    assert "backlog:     1 entries waiting" in status.stdout


def test_thousands_of_segments_within_a_low_descriptor_limit(home: Path, tmp_path: Path) -> None:
    """3,000 producers' segments with `ulimit -n 1024` (soft and hard): ready, and every entry written once."""
    for n in range(3000):
        fd = segment(home, f"{n}-many.00000001.seg")
        os.write(fd, record("INFO", "pia", f"from producer {n}"))
        os.close(fd)
    daemon = Daemon(tmp_path, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)))
    try:
        assert daemon.ready(), daemon.stderr
        wait_written(timeout=120)
        wait_for(lambda: not list((home / "spool" / "segments").iterdir()), timeout=60, what="drained segments removed")
    finally:
        assert daemon.stop() == 0
    lines = log_file(home, "users/pia/INFO.log").splitlines()
    assert sorted(lines) == sorted(f"INFO:  from producer {n}" for n in range(3000))


def test_a_clock_before_1970_is_written_not_quarantined(daemon: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer whose clock reads 1967: delay() says spooled, and the entry is written with that time."""
    import apilog.core.entry

    with monkeypatch.context() as patch:
        patch.setattr(apilog.core.entry.time, "time", lambda: -94_694_400.0)  # 1967-01-01 00:00:00 UTC
        receipt = logger.delay("INFO", "quy", "old clock")
    assert receipt.spooled
    wait_written()
    wait_for(lambda: (daemon / "logs/users/quy/INFO.log").exists(), what="the entry")
    assert log_file(daemon, "users/quy/INFO.log") == "INFO:  old clock \u00a7 [1967-01-01 00:00:00]\n"
    assert "quarantined" not in _internal(daemon)
