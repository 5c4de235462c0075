"""Fault injection on the disks and limits under a real apilogd (docs/reference.md, D5, D7).

D5: disk full or a permission error keeps messages in the spool, the daemon reports and retries.
D7: one target file that cannot be written is set aside; it never stalls the daemon for anything
else. These tests put one file past RLIMIT_FSIZE, run under a low descriptor limit, and turn the
state disk read-only before SIGTERM.
"""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from apilog import logger, settings
from apilog.spool.transport import writer_for

from .utils import Daemon, record, segment, wait_for, wait_written


def test_one_file_past_the_size_limit_does_not_stall_every_other_user(home: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE of 64 KiB (LimitFSIZE=, or a file system's own largest file); big's file is at the limit.

    Found: EFBIG is classed as a fault of the whole log disk (DISK_ERRORS), so the batch holding
    big's entry is undone and retried whole, for ever: small's entries are never written ("write
    failed ... File too large", every 10 s, naming no file). Rotation cannot help either: the
    archiver only runs after a batch that succeeded.
    """
    limit = 65536
    (home / "logs/users/big").mkdir(parents=True)
    (home / "logs/users/big/INFO.log").write_text("INFO:  old\n" * 5900)  # 64,900 bytes
    daemon = Daemon(tmp_path, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    try:
        assert daemon.ready()
        logger.delay("INFO", "big", "x" * 2000, timestamp=False)
        for n in range(5):
            logger.delay("INFO", "small", f"s{n}", timestamp=False)
        small = home / "logs/users/small/INFO.log"
        try:
            wait_for(lambda: small.exists() and "s4" in small.read_text(), timeout=15, what="small's entries")
        except AssertionError:
            pytest.fail(f"small's entries wait behind big's file: {daemon.stderr.strip().splitlines()[-1]}")
    finally:
        daemon.stop()
    assert small.read_text() == "".join(f"INFO:  s{n}\n" for n in range(5))


def test_a_low_descriptor_limit_slows_apilogd_but_never_stalls_it(home: Path, tmp_path: Path) -> None:
    """`ulimit -n 256` (soft and hard), 300 users with one entry each and 20 producers' segments.

    Found: a batch keeps up to 256 log files and up to 256 segments open whatever the limit, gets
    EMFILE, which is classed as a disk fault: the whole batch is undone and retried for ever and no
    entry of any user is written ("Too many open files", every 10 s).
    """
    users = 300
    for s in range(20):
        fd = segment(home, f"{s}-p.00000001.seg")
        os.write(fd, b"".join(record("INFO", f"u{u}", f"from {s}") for u in range(s, users, 20)))
        os.close(fd)
    daemon = Daemon(tmp_path, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    try:
        assert daemon.ready(), daemon.stderr
        try:
            wait_written(20)
        except AssertionError:
            pytest.fail(f"nothing drained under `ulimit -n 256`: {daemon.stderr.strip().splitlines()[-1]}")
    finally:
        daemon.stop()
    for u in range(users):
        assert (home / f"logs/users/u{u}/INFO.log").read_text() == f"INFO:  from {u % 20}\n"


@pytest.fixture
def home_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """APILOG_HOME (spool and state) on a 32 MB ext4 loop file system, remounted read-only on any error."""
    image, mount = tmp_path / "home.img", tmp_path / "homedisk"
    mount.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(32 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True, check=False)
    mounted = made.returncode == 0 and subprocess.run(
        ["mount", "-o", "loop,errors=remount-ro", str(image), str(mount)], capture_output=True, check=False).returncode == 0
    if not mounted:
        pytest.skip("needs root, mkfs.ext4 and a loop device")
    monkeypatch.setenv("APILOG_HOME", str(mount / "home"))
    monkeypatch.setenv("APILOG_LOG_DIR", str(tmp_path / "logs"))
    settings.reset()
    try:
        yield mount
    finally:
        writer_for(settings.current().spool_dir, False).close()
        subprocess.run(["umount", "-l", str(mount)], check=False)
        settings.reset()


def test_sigterm_while_the_state_disk_is_read_only_exits_without_a_traceback(home_disk: Path, tmp_path: Path) -> None:
    """The disk of APILOG_HOME fails (ext4 error, remounted read-only) while apilogd runs; then SIGTERM.

    Found: the stop path removes state/running and apilogd.pid unguarded; both raise EROFS, so
    apilogd exits 1 with a 54-line chained traceback instead of stopping cleanly (the log-disk
    version of this fault is handled: test_a_log_disk_gone_read_only_keeps_entries_and_stops_cleanly).
    """
    daemon = Daemon(tmp_path)
    try:
        assert daemon.ready()
        logger.delay("INFO", "ro", "before", timestamp=False)
        wait_written()
        device = os.path.basename(os.path.realpath(subprocess.run(
            ["findmnt", "-no", "SOURCE", str(home_disk)], capture_output=True, text=True, check=True).stdout.strip()))
        Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("apilog fault test")
        wait_for(lambda: "Read-only file system" in subprocess.run(
            ["touch", str(home_disk / "home" / "probe-rw")], capture_output=True, text=True, check=False).stderr,
            what="the home disk to turn read-only")
    finally:
        code = daemon.stop()
    assert "Traceback" not in daemon.stderr, daemon.stderr[-3000:]
    assert code == 0, daemon.stderr[-1000:]
    assert (tmp_path / "logs/users/ro/INFO.log").read_text() == "INFO:  before\n"


@pytest.mark.parametrize("how", ["folder", "immutable"])
def test_an_unwritable_internal_log_does_not_stall_every_user(home: Path, tmp_path: Path, how: str) -> None:
    """system/INTERNAL.log cannot be opened (a folder in its place, or chattr +i); one app sends one bad entry.

    Found: _sizes() raises for INTERNAL whatever the error ("nowhere else to put them"), so the
    whole batch is undone and retried for ever as soon as it holds any INTERNAL line. One
    unknown stream from alice stops bob's good entries too; stderr says only "Is a directory" /
    "Operation not permitted", naming no file. D7: one target file that cannot be written must
    not stall the daemon for anything else.
    """
    system = home / "logs" / "system"
    system.mkdir(parents=True)
    internal = system / "INTERNAL.log"
    if how == "folder":
        internal.mkdir()
    else:
        internal.write_text("")
        if subprocess.run(["chattr", "+i", str(internal)], capture_output=True, check=False).returncode != 0:
            pytest.skip("chattr +i is not supported here")
    daemon = Daemon(tmp_path)
    try:
        assert daemon.ready()
        logger.delay("NO SUCH STREAM", "alice", "a bad entry", timestamp=False)
        for n in range(3):
            logger.delay("INFO", "bob", f"b{n}", timestamp=False)
        bob = home / "logs/users/bob/INFO.log"
        try:
            wait_for(lambda: bob.exists() and "b2" in bob.read_text(), timeout=10, what="bob's entries")
        except AssertionError:
            pytest.fail(f"bob's entries wait behind INTERNAL.log: {daemon.stderr.strip().splitlines()[-1]}")
    finally:
        daemon.stop()
        if how == "immutable":
            subprocess.run(["chattr", "-i", str(internal)], check=False)
    assert bob.read_text() == "INFO:  b0\nINFO:  b1\nINFO:  b2\n"
