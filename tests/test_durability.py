"""docs/reference.md D1-D6 at fixed points: crashes between journal steps, torn and garbage spool files, a full disk."""

from __future__ import annotations

import base64
import contextlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
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
from apilogd.sources import open_source
from apilogd.sources.spool import SpoolSource
from apilogd.state.folders import open_folders, open_home

from apilog import logger, settings
from apilog.core import fs
from apilog.spool.frame import frame
from apilog.spool.transport import writer_for

from .utils import Daemon, log_file, record, segment, wait_for, wait_written

USERS = [f"crash{n}" for n in range(5)]


def _log_batch(count: int) -> list[tuple[str, str, str]]:
    """Log `count` entries over five users and two streams; return (relpath, line) expectations."""
    expected = []
    for n in range(count):
        user, stream = USERS[n % 5], ("INFO", "WARN")[n % 2]
        logger.delay(stream, user, f"entry {n:04d}", timestamp=False)
        expected.append((f"users/{user}/{stream}.log", f"{stream}:  entry {n:04d}\n"))
    return expected


def _seal_producer() -> None:
    writer_for(settings.current().spool_dir, False).close()


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _crash_child(point: str) -> None:
    """Run one batch of the real drain code and SIGKILL this process at `point`."""
    settings.reset()
    conf = settings.load()
    folders = open_folders(conf, open_home(conf))
    writer = BatchWriter(conf, folders, open_source(conf, folders))
    source = writer.source
    assert isinstance(source, SpoolSource)

    def wrap(obj: Any, name: str, before: Callable[..., None] | None = None, after: bool = False) -> None:
        original = getattr(obj, name)

        def patched(*args: Any, **kwargs: Any) -> Any:
            if before:
                before(*args)
            result = original(*args, **kwargs)
            if after:
                _kill_self()
            return result

        setattr(obj, name, patched)

    calls = {"append": 0}
    held = contextlib.ExitStack()  # never closed: the child dies with the observer in place

    def half_then_die(relpath: str, data: bytes) -> None:
        calls["append"] += 1
        if (calls["append"] == 3) if point == "mid-append" else relpath.startswith("seals/"):
            target = Path(conf.log_dir) / relpath
            target.parent.mkdir(parents=True, exist_ok=True)  # a new file (and folder) is made by its first append
            with open(target, "ab") as torn:
                torn.write(data[: len(data) // 2 + 1])  # past a line's end: a torn line
            _kill_self()

    def torn_record(*args: Any) -> None:
        def half(operation: str, call: tuple[Any, ...]) -> None:
            if operation == "write" and call[0] == writer.journal.fd:
                os.write(call[0], call[1][: len(call[1]) // 2])
                _kill_self()

        held.enter_context(fs.observe(half))  # every write goes through core.fs; only in this child, which dies in it

    if point == "mid-record":
        wrap(writer.journal, "append", before=torn_record)
    elif point == "after-record":
        wrap(writer.journal, "append", after=True)
    elif point in ("mid-append", "mid-seal-line"):
        wrap(writer.files, "append", before=half_then_die)
    elif point == "after-appends":
        wrap(writer, "_apply", after=True)
    elif point == "mid-checkpoint":
        wrap(writer.ledger, "save", after=True)
    elif point == "after-ack":
        wrap(source.reader, "remove", before=lambda *a: _kill_self())
    source.look_for_input()
    writer.step()
    writer.checkpoint()
    os._exit(0)  # the crash point was not reached


CRASH_POINTS = ["mid-record", "after-record", "mid-append", "mid-seal-line", "after-appends", "mid-checkpoint",
                "after-ack"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_at_each_journal_step(home: Path, point: str) -> None:
    """SIGKILL at each step of a batch; after a restart every entry is in its file exactly once, whole.

    mid-record: the journal record torn (never committed; the batch is read again from the spool).
    after-record: committed, no file touched (redone from the journal). mid-append: a torn line
    (cut back, redone). after-appends: every line in, no checkpoint (redone over itself).
    mid-checkpoint: the ledger saved, the journal not yet emptied (its records are not redone).
    after-ack: a drained segment being removed. mid-seal-line: the batch's seal line torn (cut back, redone).
    Through each, the seals stay one with the files: `apilog verify` finds the tree intact.
    """
    expected = _log_batch(60)
    _seal_producer()
    child = multiprocessing.get_context("fork").Process(target=_crash_child, args=(point,))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    if point == "mid-append":
        torn = [p for p in (home / "logs" / "users").rglob("*.log") if not p.read_text().endswith("\n")]
        assert torn, "the crash left no torn line to recover from"
    control.start(settings.load())
    try:
        wait_written()
    finally:
        control.stop(settings.load())
    by_file: dict[str, str] = {}
    for relpath, line in expected:
        by_file[relpath] = by_file.get(relpath, "") + line
    for relpath, text in by_file.items():
        assert log_file(home, relpath) == text
    assert not list((home / "spool" / "segments").iterdir())
    verified = subprocess.run([sys.executable, "-m", "apilog", "verify"], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout


def test_a_file_a_crash_left_past_the_rotation_size_is_rotated_at_the_first_tick(home: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch committed by a killed run and redone at the next start counts as a batch for rotation: the files it
    grew past APILOG_ROTATE_BYTES are rotated between the first batches, not at the first sweep seconds later
    (a run killed right after its last batch used to leave them live until then)."""
    monkeypatch.setenv("APILOG_ROTATE_BYTES", "100")
    expected = _log_batch(60)  # 12 lines, about 170 bytes, in each of ten files
    _seal_producer()
    child = multiprocessing.get_context("fork").Process(target=_crash_child, args=("after-record",))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    conf = settings.load()
    folders = open_folders(conf, open_home(conf))
    writer = BatchWriter(conf, folders)  # redoes the killed run's batch, as apilogd's start does
    archiver = Archiver(conf, writer)
    try:
        assert archiver.tick() == 10  # before any batch: what the redo grew
    finally:
        archiver.close()
        writer.close()
        folders.close()
    files = {relpath for relpath, _ in expected}
    archived = {str(p.relative_to(home / "logs" / "archive").parent / p.name.split(".", 1)[0]) + ".log"
                for p in (home / "logs" / "archive").rglob("*.log")}
    assert archived == files
    assert not any((home / "logs" / relpath).exists() for relpath in files)


def test_half_written_record_waits_for_a_live_producer(daemon: Path) -> None:
    """A record half written by a live producer is neither taken nor quarantined; once whole, it is written."""
    fd = segment(daemon, "999-live.00000001.seg")
    half = record("INFO", "olga", "finished later")
    os.write(fd, half[:30])
    time.sleep(0.5)
    assert not (daemon / "logs" / "users" / "olga").exists()
    os.write(fd, half[30:])
    wait_written()
    assert log_file(daemon, "users/olga/INFO.log") == "INFO:  finished later\n"
    assert not list((daemon / "spool" / "quarantine").iterdir())
    os.close(fd)


def test_torn_tail_of_a_dead_producer_is_quarantined(daemon: Path) -> None:
    """A producer that died mid-write leaves a torn tail: the whole records are written, the tail quarantined."""
    fd = segment(daemon, "998-dead.00000001.seg")
    os.write(fd, record("INFO", "pat", "whole one") + record("INFO", "pat", "torn one")[:40])
    os.close(fd)
    internal = daemon / "logs" / "system" / "INTERNAL.log"
    wait_for(lambda: internal.exists() and "torn record" in internal.read_text(), what="the torn tail's report")
    assert log_file(daemon, "users/pat/INFO.log") == "INFO:  whole one\n"
    quarantined = list((daemon / "spool" / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].stat().st_size == 40


def _framed(message: dict[str, Any]) -> bytes:
    return frame(json.dumps(message).encode())


def test_garbage_is_quarantined_and_never_blocks(daemon: Path) -> None:
    """Random bytes, pickle, a foreign task and non-JSON are quarantined and reported; good entries still land."""
    good = json.loads(record("INFO", "quinn", "after the garbage")[12:])
    pickled = {**good, "content-type": "application/x-python-serialize",
               "body": base64.b64encode(pickle.dumps(([], {}, {}))).decode()}
    foreign = {**good, "headers": {**good["headers"], "task": "os.system"}}
    fd = segment(daemon, "997-garbage.00000001.seg")
    os.write(fd, b"\x00\xffnot a record at all" + _framed(pickled) + _framed(foreign)
             + frame(b"{not json") + record("INFO", "quinn", "after the garbage"))
    os.close(fd)
    (daemon / "spool" / "segments" / "dropped-by-hand.msg").write_bytes(pickle.dumps({"x": 1}))
    spool = daemon / "spool"
    wait_for(lambda: len(list((spool / "quarantine").iterdir())) == 5 and not list((spool / "segments").iterdir()),
             what="the garbage to be quarantined")
    wait_written()
    assert log_file(daemon, "users/quinn/INFO.log") == "INFO:  after the garbage\n"
    internal = log_file(daemon, "system/INTERNAL.log")
    assert internal.count("INTERNAL: quarantined spool message") == 5
    assert "only JSON is accepted" in internal and "'os.system' is not 'apilog.log'" in internal
    assert "not JSON" in internal and "not a framed record" in internal


def test_disk_full_then_space_back(home: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch,
                                   tmp_path: Path) -> None:
    """The log disk full (ENOSPC): entries wait in the spool, the daemon lives; once there is room, each lands once."""
    monkeypatch.setenv("APILOG_LOG_DIR", str(small_disk))
    settings.reset()
    daemon = Daemon(tmp_path)
    try:
        assert daemon.ready()
        logger.delay("INFO", "rita", "before the disk filled", timestamp=False)
        wait_written()
        filler = small_disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):  # every block, the reserved ones too (we are root, as the daemon)
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
        os.close(fd)
        for n in range(200):
            logger.delay("INFO", "rita", f"entry {n:03d} " + "x" * 2000, timestamp=False)  # past any preallocation
        wait_for(lambda: "write failed, entries wait in the spool or the journal" in daemon.stderr, what="the write failure")
        assert daemon.proc.poll() is None
        assert control.status(settings.load()).backlog > 0
        filler.unlink()
        wait_written(timeout=40)
        internal = small_disk / "system" / "INTERNAL.log"
        wait_for(lambda: internal.exists() and "recovered from a write error" in internal.read_text(),
                 what="the recovery note")
    finally:
        assert daemon.stop() == 0
    lines = (small_disk / "users" / "rita" / "INFO.log").read_text().splitlines()
    assert lines == ["INFO:  before the disk filled"] + [f"INFO:  entry {n:03d} " + "x" * 2000 for n in range(200)]


def test_stale_tmp_files_are_swept(home: Path) -> None:
    """A producer that died between creating and publishing a segment leaves it in tmp/: emptied away, or quarantined."""
    from apilog import spool

    dirs = spool.ensure(home / "spool")
    (dirs["tmp"] / "1-dead.00000001.seg").write_bytes(b"")
    (dirs["tmp"] / "planted").write_bytes(b"something")
    (dirs["tmp"] / "fresh.00000001.seg").write_bytes(b"")
    old = time.time() - 3600
    for name in ("1-dead.00000001.seg", "planted"):
        os.utime(dirs["tmp"] / name, (old, old))
    control.start(settings.load())
    try:
        internal = home / "logs" / "system" / "INTERNAL.log"
        wait_for(lambda: internal.exists() and "tmp folder" in internal.read_text(), what="the sweep's report")
    finally:
        control.stop(settings.load())
    assert sorted(p.name for p in dirs["tmp"].iterdir()) == ["fresh.00000001.seg"]
    assert (dirs["quarantine"] / "tmp.planted").read_bytes() == b"something"
    assert "quarantined a file left in the spool's tmp folder" in log_file(home, "system/INTERNAL.log")


def _producer_syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count this process's fdatasync and fsync calls (the producer side of delay())."""
    calls: list[int] = []
    for name in ("fdatasync", "fsync"):
        real = getattr(os, name)

        def counted(fd: int, real: Callable[[int], None] = real) -> None:
            calls.append(fd)
            real(fd)

        monkeypatch.setattr(os, name, counted)
    return calls


def _daemon_syncs(tmp_path: Path) -> Counter[str]:
    """Run a real apilogd under strace until the spool is drained; count its fsync, fdatasync and syncfs calls."""
    trace = tmp_path / "syncs.strace"
    proc = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync,syncfs", "-o", str(trace),
                             sys.executable, "-m", "apilogd", "run"], stderr=subprocess.DEVNULL)
    try:
        wait_written(30)
        wait_for(lambda: (Path(settings.load().state_dir) / "journal").stat().st_size == 0, what="a checkpoint")
    finally:
        pid = control.running_pid(settings.load().home)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)  # the daemon itself: strace, signalled, would only let go of it
        else:
            proc.kill()
        assert proc.wait(30) == 0  # strace exits with its tracee's status
    return Counter(m.group(1) for line in trace.read_text().splitlines()
                   if (m := re.search(r"\b(fsync|fdatasync|syncfs)\(", line)))


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (.ci/run installs it)")
@pytest.mark.parametrize("mode", ["off", "batch", "always"])
def test_fsync_modes_sync_what_they_say(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """APILOG_FSYNC changes durability, never content: off syncs nothing, batch syncs in the daemon (the journal's
    fdatasync and the checkpoint's syncfs), always also in the producer, at each call. Syncs are counted (strace)."""
    monkeypatch.setenv("APILOG_FSYNC", mode)
    settings.reset()
    producer = _producer_syncs(monkeypatch)
    for n in range(20):
        logger.delay("INFO", "sam", f"n{n}", timestamp=False)
    _seal_producer()
    daemon = _daemon_syncs(tmp_path)
    assert log_file(home, "users/sam/INFO.log") == "".join(f"INFO:  n{n}\n" for n in range(20))
    if mode == "off":
        assert (len(producer), sum(daemon.values())) == (0, 0), daemon
    else:  # the journal's record of each batch, then a checkpoint's sync of the log file system
        assert daemon["fdatasync"] >= 1 and daemon["syncfs"] >= 1, daemon
        # 20 calls one after another with `always`: each waits for its own
        assert len(producer) == 0 if mode == "batch" else len(producer) >= 20


def test_threads_share_fsyncs_without_losing_order(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With APILOG_FSYNC=always, threads calling delay() at once each get their entries, in their order."""
    import threading

    monkeypatch.setenv("APILOG_FSYNC", "always")
    settings.reset()
    syncs = _producer_syncs(monkeypatch)

    def worker(t: int) -> None:
        for n in range(150):
            logger.delay("INFO", f"thread{t}", f"n{n:03d}", timestamp=False)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("fdatasyncs for 1,200 calls from 8 threads:", len(syncs))
    assert 1 <= len(syncs) < 1200  # group commit: threads share fsyncs
    control.start(settings.load())
    try:
        wait_written()
    finally:
        control.stop(settings.load())
    for t in range(8):
        assert log_file(home, f"users/thread{t}/INFO.log") == "".join(f"INFO:  n{n:03d}\n" for n in range(150))
