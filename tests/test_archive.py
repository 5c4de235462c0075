"""SPEC 9: rotation by size and age through a real daemon, gzip off the write path, retention, `apilog archive`."""

from __future__ import annotations

import gzip
import multiprocessing
import os
import subprocess
import time
from pathlib import Path

import pytest
from apilogd import control
from click.testing import CliRunner

from apilog import logger, settings
from apilog._reading import archives, read_text
from apilog.cli import main
from apilog.spool.transport import writer_for

from .conftest import log_file, wait_for, wait_written


def lineage(home: Path, relpath: str) -> str:
    """Everything ever written to a live file: its archives in rotation order, then the live file."""
    folder, _, name = relpath.rpartition("/")
    stem = name.rsplit(".", 1)[0]
    parts = [p for p in archives(home / "logs" / "archive" / folder) if p.name.split(".", 1)[0] == stem]
    text = "".join(read_text(p) for p in parts)
    live = home / "logs" / relpath
    return text + (live.read_text() if live.exists() else "")


def _settle(home: Path) -> None:
    """Wait until no plain or temporary archive is left: every rotation is compressed."""
    archive = home / "logs" / "archive"
    wait_for(lambda: not [p for p in archive.rglob("*") if p.is_file() and not p.name.endswith(".gz")],
             what="compression to finish")


def _produce(producer: int, count: int) -> None:
    settings.reset()
    for n in range(count):
        logger.delay("INFO", f"arch{n % 3}", f"p{producer} n{n:05d} " + "r" * 50, timestamp=False)
        if n % 10 == 0:
            time.sleep(0.01)  # many small batches, so files cross the limit many times
    writer_for(settings.current().spool_dir, False).close()


def test_size_rotation_under_load_loses_nothing(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny APILOG_ROTATE_BYTES while 3 producers log: every entry once across live files and gzip archives."""
    monkeypatch.setenv("APILOG_ROTATE_BYTES", "1000")
    settings.reset()
    control.start(settings.load())
    try:
        procs = [multiprocessing.get_context("fork").Process(target=_produce, args=(p, 900)) for p in range(3)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        wait_written()
        time.sleep(0.5)  # the last batch's files may still be rotated
        _settle(home)
    finally:
        control.stop(settings.load())
    archives = sorted((home / "logs" / "archive").rglob("*.gz"))
    assert len(archives) >= 9  # several rotations of each file
    for path in archives:
        assert subprocess.run(["gzip", "-t", str(path)]).returncode == 0
        assert path.stat().st_mode & 0o777 == 0o640
    for user in range(3):
        lines = lineage(home, f"users/arch{user}/INFO.log").splitlines()
        got = [line.split("  ", 1)[1].split(" r")[0] for line in lines]
        want = [f"p{p} n{n:05d}" for p in range(3) for n in range(900) if n % 3 == user]
        assert sorted(got) == sorted(want)  # each exactly once: no loss, no double, no overwritten archive
        for p in range(3):
            mine = [g for g in got if g.startswith(f"p{p} ")]
            assert mine == sorted(mine)  # each producer's order survives rotation


def test_age_rotation(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live file whose first entry is older than APILOG_ROTATE_AGE moves to archive/ within seconds."""
    monkeypatch.setenv("APILOG_ROTATE_AGE", "2")
    settings.reset()
    control.start(settings.load())
    try:
        logger.delay("WARN", "aged", "old news", timestamp=False)
        wait_written()
        live = home / "logs" / "users" / "aged" / "WARN.log"
        assert live.exists()
        wait_for(lambda: not live.exists(), timeout=10, what="age rotation")
        _settle(home)
        logger.delay("WARN", "aged", "fresh", timestamp=False)
        wait_written()
    finally:
        control.stop(settings.load())
    assert lineage(home, "users/aged/WARN.log") == "WARN:  old news\nWARN:  fresh\n"


def test_a_producer_clock_days_behind_does_not_rotate_every_batch(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Age is judged by the daemon's clock at a file's first write: entries stamped two days ago rotate nothing."""
    import apilog.core.entry

    monkeypatch.setenv("APILOG_ROTATE_AGE", "86400")
    settings.reset()
    control.start(settings.load())
    try:
        with monkeypatch.context() as patch:
            behind = time.time() - 2 * 86400
            patch.setattr(apilog.core.entry.time, "time", lambda: behind)
            for n in range(8):
                logger.delay("INFO", "lagging", f"n{n}", timestamp=False)
                time.sleep(0.4)  # several batches, each past the age check's one-second period
        wait_written()
        time.sleep(1.5)
    finally:
        control.stop(settings.load())
    assert not [p for p in (home / "logs").rglob("*") if "archive" in p.parts and "lagging" in p.parts]
    assert log_file(home, "users/lagging/INFO.log") == "".join(f"INFO:  n{n}\n" for n in range(8))


def test_retention_deletes_old_archives(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """APILOG_RETAIN_DAYS=1: an archive 3 days old goes, one from today stays."""
    monkeypatch.setenv("APILOG_RETAIN_DAYS", "1")
    settings.reset()
    folder = home / "logs" / "archive" / "users" / "ret"
    folder.mkdir(parents=True)
    old, new = folder / "INFO.20200101T000000Z.log.gz", folder / "INFO.20990101T000000Z.log.gz"
    for path in (old, new):
        path.write_bytes(gzip.compress(b"INFO:  x\n"))
    past = time.time() - 3 * 86400
    os.utime(old, (past, past))
    control.start(settings.load())
    try:
        wait_for(lambda: not old.exists(), what="retention")
    finally:
        control.stop(settings.load())
    assert new.exists()


@pytest.mark.parametrize("running", [True, False])
def test_apilog_archive_rotates_now(home: Path, running: bool) -> None:
    """`apilog archive` rotates every live file at once, through the daemon or, if none runs, by itself."""
    control.start(settings.load())
    logger.delay("INFO,ERROR", "now", "rotate me", timestamp=False)
    wait_written()
    if not running:
        control.stop(settings.load())
    try:
        result = CliRunner().invoke(main, ["archive"])
        assert result.exit_code == 0, result.output
        assert result.output == "rotated 2 live files into archive/\n"
        _settle(home)
    finally:
        control.stop(settings.load())
    assert not (home / "logs" / "users" / "now" / "INFO.log").exists()
    assert lineage(home, "users/now/INFO.log") == "INFO:  rotate me\n"
    assert lineage(home, "users/now/ERROR.log") == "ERROR:  rotate me\n"


def test_interrupted_compression_is_finished(home: Path) -> None:
    """A crash mid-gzip leaves a .tmp and the plain copy; another after the rename leaves both: each is put right."""
    folder = home / "logs" / "archive" / "users" / "cut"
    folder.mkdir(parents=True)
    (folder / "INFO.20250101T000000Z.log").write_text("INFO:  one\n")
    (folder / "INFO.20250101T000000Z.log.gz.tmp").write_bytes(b"\x1f\x8b half a gzip")
    (folder / "INFO.20250102T000000Z.log").write_text("INFO:  two\n")
    (folder / "INFO.20250102T000000Z.log.gz").write_bytes(gzip.compress(b"INFO:  two\n"))
    control.start(settings.load())
    try:
        _settle(home)
    finally:
        control.stop(settings.load())
    assert sorted(p.name for p in folder.iterdir()) == ["INFO.20250101T000000Z.log.gz", "INFO.20250102T000000Z.log.gz"]
    assert lineage(home, "users/cut/INFO.log") == "INFO:  one\nINFO:  two\n"


def test_inotify_limit_falls_back_to_polling(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no inotify instance to be had, the archiver polls, says so in INTERNAL, and still rotates by size."""
    limit = Path("/proc/sys/fs/inotify/max_user_instances")
    if not os.access(limit, os.W_OK):
        pytest.skip("needs root to lower inotify's limit")
    monkeypatch.setenv("APILOG_ROTATE_BYTES", "500")
    settings.reset()
    original = limit.read_text()
    limit.write_text("0\n")
    try:
        control.start(settings.load())
    finally:
        limit.write_text(original)
    try:
        for n in range(20):
            logger.delay("INFO", "polled", f"entry {n:02d} " + "p" * 40, timestamp=False)
        wait_written()
        wait_for(lambda: any((home / "logs" / "archive").rglob("*.gz")), what="a rotation found by polling")
        _settle(home)
    finally:
        control.stop(settings.load())
    assert "archiver falls back to polling" in log_file(home, "system/INTERNAL.log")
    assert lineage(home, "users/polled/INFO.log") == "".join(f"INFO:  entry {n:02d} {'p' * 40}\n" for n in range(20))


def _internal(home: Path) -> str:
    path = home / "logs" / "system" / "INTERNAL.log"
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize("running", [True, False])
def test_a_file_that_cannot_be_rotated_stays_live_and_the_others_still_rotate(home: Path, running: bool) -> None:
    """Found: the first file whose rename failed ended the whole `apilog archive` (the rest never rotated,
    and the command waited 30 s for an answer). Now each file is tried; the one that fails stays live,
    is named on stderr (exit 1) and once in INTERNAL, and rotates once the obstacle is gone."""
    control.start(settings.load())
    try:
        logger.delay("INFO", "kim", "kim one", timestamp=False)
        logger.delay("INFO", "lee", "lee one", timestamp=False)
        wait_written()
        blocker = home / "logs" / "archive" / "users" / "kim"
        blocker.parent.mkdir(parents=True)
        blocker.write_text("a file where kim's archive folder goes\n")
        if not running:
            control.stop(settings.load())
        result = CliRunner().invoke(main, ["archive"])
        assert result.exit_code == 1, result.output
        assert result.stdout == "rotated 1 live file into archive/\n"
        assert "could not rotate users/kim/INFO.log: " in result.stderr
        assert log_file(home, "users/kim/INFO.log") == "INFO:  kim one\n"  # still live, nothing lost
        assert lineage(home, "users/lee/INFO.log") == "INFO:  lee one\n"
        if running:
            wait_for(lambda: "rotation failed, will retry" in _internal(home) and "users/kim/INFO.log" in _internal(home),
                     what="the failure in INTERNAL")
            logger.delay("INFO", "kim", "kim two", timestamp=False)  # writing goes on
            wait_written()
        blocker.unlink()
        control.start(settings.load())
        result = CliRunner().invoke(main, ["archive"])
        assert result.exit_code == 0, result.output
        assert "1 live file" in result.stdout or "2 live files" in result.stdout
        _settle(home)
        if running:
            wait_for(lambda: "rotation works again" in _internal(home), what="the recovery in INTERNAL")
    finally:
        control.stop(settings.load())
    assert not (home / "logs" / "users" / "kim" / "INFO.log").exists()
    assert lineage(home, "users/kim/INFO.log") == ("INFO:  kim one\nINFO:  kim two\n" if running else "INFO:  kim one\n")
    verified = CliRunner().invoke(main, ["verify"])
    assert verified.exit_code == 0, verified.output  # the failed rotation's seal line went with its record


def test_a_compression_that_fails_leaves_a_readable_archive_and_is_finished_later(home: Path) -> None:
    """gzip cannot write its temporary file (a folder stands there): the plain archive stays whole and
    readable, INTERNAL says so, and a later sweep (here the first after a restart) compresses it."""
    control.start(settings.load())
    try:
        logger.delay("INFO", "gz", "keep me", timestamp=False)
        wait_written()
        folder = home / "logs" / "archive" / "users" / "gz"
        now = int(time.time())
        blockers = [folder / f"INFO.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(t))}.log.gz.tmp"
                    for t in range(now - 1, now + 30)]  # whatever second the rotation takes
        for path in blockers:
            path.mkdir(parents=True)
        result = CliRunner().invoke(main, ["archive"])
        assert result.exit_code == 0, result.output
        wait_for(lambda: "archive compression failed; will retry" in _internal(home), what="the failure in INTERNAL")
        plain = [p for p in folder.iterdir() if p.name.endswith(".log")]
        assert [p.read_text() for p in plain] == ["INFO:  keep me\n"]
        assert lineage(home, "users/gz/INFO.log") == "INFO:  keep me\n"
        for path in blockers:
            path.rmdir()
        control.stop(settings.load())
        control.start(settings.load())
        _settle(home)
    finally:
        control.stop(settings.load())
    assert [p.name.endswith(".log.gz") for p in folder.iterdir()] == [True]
    assert lineage(home, "users/gz/INFO.log") == "INFO:  keep me\n"
