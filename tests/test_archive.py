"""docs/reference.md: rotation by size and age through a real daemon, gzip off the write path, retention, `apilog archive`."""

from __future__ import annotations

import gzip
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from apilogd.archive.archiver import Archiver
from apilogd.commit.batch import BatchWriter
from apilogd.process import control
from apilogd.state.folders import open_folders, open_home
from click.testing import CliRunner

from apilog import logger, settings
from apilog.cli import main
from apilog.core.tree import LogTree
from apilog.reading import archives, read_text
from apilog.spool.transport import writer_for

from .utils import log_file, take_seal_key, wait_for, wait_written


def lineage(home: Path, relpath: str) -> str:
    """Everything ever written to a live file: its archives in rotation order, then the live file."""
    folder, _, name = relpath.rpartition("/")
    stem = name.rsplit(".", 1)[0]
    parts = [p for p in archives(home / "logs" / "archive" / folder) if p.name.split(".", 1)[0] == stem]
    tree = LogTree(home / "logs")
    text = "".join(read_text(tree, p, 1 << 30) for p in parts)
    tree.close()
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


# ---------------------------------------------------------------- one name per entry through the switch to .gz

ENTRY_ID = re.compile(r"id=p\d+\.\d+;")
PRODUCER = """
import sys, time
from apilog import logger
p, end, n = sys.argv[1], time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end:
    logger.delay(("INFO", "WARN")[n % 2], f"sw{n % 4}", f"id=p{p}.{n}; " + "s" * 40, timestamp=False)
    n += 1
    time.sleep(0.002)
print(n)
"""


def _scan(logs: Path, *tops: str) -> Counter[str]:
    """What a naive shipper or backup reads of `tops`: every regular file not named `.tmp`, gunzipped when its bytes
    are gzip's whatever its name, each entry counted by its id; a file gone since the folder was listed is skipped."""
    seen: Counter[str] = Counter()
    for top in tops:
        for dirpath, _dirs, names in os.walk(logs / top):
            for name in names:
                if name.endswith(".tmp"):
                    continue
                try:
                    data = (Path(dirpath) / name).read_bytes()
                except FileNotFoundError:
                    continue
                seen.update(ENTRY_ID.findall((gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode()))
    return seen


def _once_each(seen: Counter[str]) -> None:
    twice = sorted(i for i, n in seen.items() if n > 1)
    assert not twice, f"{len(twice)} entries under two names in archive/ at once, e.g. {twice[:3]}"


def _unfinished(logs: Path) -> list[Path]:
    """Archives not compressed and switched yet: plain ones, halfway ones, and `.tmp`s."""
    return [p for p in (logs / "archive").rglob("*") if p.is_file() and not p.name.endswith(".gz")]


def _log(producer: int, count: int, pad: Callable[[], str] = lambda: "s" * 40) -> set[str]:
    """`count` entries over the producers' files, written; their ids."""
    for n in range(count):
        logger.delay(("INFO", "WARN")[n % 2], f"sw{n % 4}", f"id=p{producer}.{n}; {pad()}", timestamp=False)
    wait_written()
    return {f"id=p{producer}.{n};" for n in range(count)}


def _archive_now() -> int:
    """`apilog archive`: how many live files it rotated."""
    done = subprocess.run([sys.executable, "-m", "apilog", "archive"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[1])


def _verify(home: Path, key: Path) -> None:
    found = subprocess.run([sys.executable, "-m", "apilog", "verify", "--key", str(key)], capture_output=True, text=True)
    assert found.returncode == 0, found.stdout + found.stderr


def test_each_entry_has_one_name_in_archive_at_every_moment(home: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Found (issue 22): after each compression the plain archive stayed beside its complete .gz until a later batch
    removed it (and for good when apilogd stopped then), so a shipper, zcat or a backup read its entries twice. Now
    the .gz takes the plain copy's place in two renames, each leaving every entry under one name; a reader that reads
    every file but the `.tmp`s, by their bytes, sees each entry once: (a) while producers log and `apilog archive` runs
    again and again, (b) right after `apilog archive` returns, (c) after `apilogd stop` right after one, and after
    the next start, with the tree verifying each time."""
    monkeypatch.setenv("APILOG_ROTATE_BYTES", "3000")  # rotations by size all along, beside the asked ones
    settings.reset()
    logs = home / "logs"
    control.start(settings.load())
    try:
        key = take_seal_key(tmp_path / "key")
        producers = [subprocess.Popen([sys.executable, "-c", PRODUCER, str(p), "4"], stdout=subprocess.PIPE, text=True)
                     for p in range(3)]
        scans, calls = 0, 0
        while calls < 3 or any(p.poll() is None for p in producers):  # (a)
            call = subprocess.Popen([sys.executable, "-m", "apilog", "archive"], stdout=subprocess.DEVNULL)
            while call.poll() is None:
                _once_each(_scan(logs, "archive"))
                scans += 1
            for _ in range(3):  # its compressions and switches follow
                _once_each(_scan(logs, "archive"))
                scans += 1
            assert call.returncode == 0
            calls += 1
        written = {f"id=p{p}.{n};" for p, proc in enumerate(producers) for n in range(int(proc.communicate()[0]))}
        wait_written()
        written |= _log(8, 8)  # (b): live files for `apilog archive` to rotate (below the size limit)
        assert _archive_now() > 0
        deadline = time.monotonic() + 20
        while _unfinished(logs):
            assert time.monotonic() < deadline, "compression did not finish"
            _once_each(_scan(logs, "archive"))
        assert _scan(logs, "archive") == Counter(written)  # every entry rotated, each once
    finally:
        control.stop(settings.load())
    # (c): live files that take a while to gzip, rotated by `apilog archive`, and the stop at once.
    monkeypatch.setenv("APILOG_ROTATE_BYTES", str(64 << 20))
    settings.reset()
    control.start(settings.load())
    try:
        written |= _log(9, 160, lambda: os.urandom(30000).hex())
        assert _archive_now() > 0
    finally:
        control.stop(settings.load())
    left = len(_unfinished(logs))  # queued compressions wait for the next start, as plain archives
    assert _scan(logs, "archive", "users", "system") == Counter(written)
    _verify(home, key)
    control.start(settings.load())  # what the stop left is finished
    try:
        wait_for(lambda: not _unfinished(logs), what="the compressions left at the stop")
    finally:
        control.stop(settings.load())
    assert _scan(logs, "archive", "users", "system") == Counter(written)
    _verify(home, key)
    print(f"\n{scans} scans during {calls} `apilog archive` calls, {len(written)} entries; the stop left {left} archives")


def _crash_while_switching(point: str) -> None:
    """`apilog archive` with apilogd stopped, run by the real code, SIGKILLed at `point` of the switches to .gz."""
    settings.reset()
    conf = settings.load()
    folders = open_folders(conf, open_home(conf))
    writer = BatchWriter(conf, folders)
    archiver = Archiver(conf, writer)
    archiver.rotate_all()
    archiver.close(wait=True)  # every .gz.tmp written and handed to the writer

    def kill_around(obj: Any, name: str, *, before: bool) -> None:
        original: Callable[..., Any] = getattr(obj, name)

        def patched(*args: Any, **kwargs: Any) -> Any:
            if before:
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(obj, name, patched)

    if point in ("before-record", "after-record"):
        kill_around(writer.journal, "append", before=point == "before-record")
    else:  # the first switch's first rename (the .gz.tmp over the plain name), or its second (that name to .gz)
        kill_around(writer.tree, "replace" if point == "between-renames" else "rename", before=False)
    writer.step(only_notes=True)
    os._exit(0)  # the crash point was not reached


@pytest.mark.parametrize("point", ["before-record", "after-record", "between-renames", "after-renames"])
def test_a_crash_while_switching_to_gz_leaves_each_entry_once_and_a_tree_that_verifies(
        home: Path, tmp_path: Path, point: str) -> None:
    """SIGKILL at each step of the switch: before its record (a .gz.tmp beside the plain copy), after it (redone
    at start), between its two renames (the gzip bytes under the plain name) and after them. The state the crash
    leaves holds each entry under one name, apilog's readers read it, and it verifies; so does the tree once the
    next start has finished the switch."""
    logs = home / "logs"
    control.start(settings.load())
    try:
        for n in range(60):
            logger.delay(("INFO", "WARN")[n % 2], f"cr{n % 3}", f"id=p0.{n};", timestamp=False)
        wait_written()
        key = take_seal_key(tmp_path / "key")
    finally:
        control.stop(settings.load())
    written = Counter(f"id=p0.{n};" for n in range(60))
    child = multiprocessing.get_context("fork").Process(target=_crash_while_switching, args=(point,))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    left = sorted(p.name for p in _unfinished(logs))
    assert left, "the crash left every switch done"
    assert _scan(logs, "archive", "users", "system") == written, left
    read_back = "".join(lineage(home, f"users/cr{u}/{stream}.log") for u in range(3) for stream in ("INFO", "WARN"))
    assert Counter(ENTRY_ID.findall(read_back)) == written  # apilog's own readers, gzip told by its bytes
    _verify(home, key)
    control.start(settings.load())
    try:
        wait_for(lambda: not _unfinished(logs), what="the switches finished")
    finally:
        control.stop(settings.load())
    assert _scan(logs, "archive", "users", "system") == written
    _verify(home, key)
