"""A hostile member of the spool group: a little input that costs apilogd a lot (docs/reference.md, D7), with real users."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .utils import Daemon, Site, wait_for

# 16,384 four-byte stretches that each start like a record: each is "a damaged record" of its own.
MAGIC_GARBAGE = ("import os; open('spool/tmp/666-garbage.00000001.seg', 'wb').write(b'APL1' * 16384); "
                 "os.rename('spool/tmp/666-garbage.00000001.seg', 'spool/segments/666-garbage.00000001.seg')")

# A sparse segment: 4 GiB long, no block on disk (the attacker's quota is not touched).
# Made aside and renamed in whole, as a producer publishes: the daemon sees it only as 4 GiB of holes.
SPARSE = """
import os
fd = os.open('spool/tmp/666-sparse.00000001.seg', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
os.ftruncate(fd, 4 << 30)
os.close(fd)
os.rename('spool/tmp/666-sparse.00000001.seg', 'spool/segments/666-sparse.00000001.seg')
print(os.stat('spool/segments/666-sparse.00000001.seg').st_blocks)
"""

# Well-formed records whose message nests lists 900 deep, with dict_to_string: ~3.5 KB each in the spool.
NESTED = """
import base64, json, os, sys, time, uuid
sys.path.insert(0, sys.argv[1])
from apilog.core import wire
from apilog.spool.frame import frame
out = []
for n in range(int(sys.argv[2])):
    fields = dict(v=1, id=str(uuid.uuid4()), ts=time.time(), streams=['INFO'], location='eve', message={'a': 'HOLE'},
                heading=None, dict_to_string=True, timestamp=False)
    stored = json.loads(wire.encode(fields))
    body = base64.b64decode(stored['body']).decode().replace('"HOLE"', '[' * 900 + ']' * 900)
    stored['body'] = base64.b64encode(body.encode()).decode()
    out.append(frame(json.dumps(stored).encode()))
print(open('spool/tmp/666-nested.00000001.seg', 'wb').write(b''.join(out)))
os.rename('spool/tmp/666-nested.00000001.seg', 'spool/segments/666-nested.00000001.seg')
"""

ROOT = str(Path(__file__).resolve().parents[1])


def _app(site: Site, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*site.python, "-c", code, *args], check=False, cwd=site.home, env=site.env,
                          capture_output=True, text=True,
                          user=site.app_user, group=site.app_user, extra_groups=[site.group], umask=0o022)


def _another_app_logs(site: Site, text: str) -> float:
    """Seconds until an entry of another app process is in its file (at most 5)."""
    start = time.monotonic()
    logged = _app(site, f"from apilog import logger; logger.delay('INFO', 'ann', {text!r}, timestamp=False)")
    assert logged.returncode == 0, logged.stderr
    log = site.home / "logs/users/ann/INFO.log"
    wait_for(lambda: log.exists() and text in log.read_text(), timeout=5, what=f"another app's entry {text!r}")
    return time.monotonic() - start


def _disk_use(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def test_64_kb_of_magic_bytes_stall_everyone(site: Site) -> None:
    """64 KB of `APL1` repeated must not become 16,384 quarantines (each fsynced) holding up another app's entry."""
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        _another_app_logs(site, "before")
        planted = _app(site, MAGIC_GARBAGE)
        assert planted.returncode == 0, planted.stderr
        quarantine = site.home / "spool/quarantine"
        _another_app_logs(site, "during")
        wait_for(lambda: not (site.home / "spool/segments/666-garbage.00000001.seg").exists(),
                 what="the garbage to be quarantined")
        assert len(os.listdir(quarantine)) <= 2  # one damaged stretch, not one per `APL1`
    finally:
        daemon.kill()  # SIGTERM would wait for the batch of 16,384 quarantines


def test_a_sparse_segment_makes_apilogd_fill_the_disk(site: Site) -> None:
    """A 4 GiB sparse segment (no block of the attacker's) must not make apilogd write gigabytes into quarantine."""
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        planted = _app(site, SPARSE)
        assert planted.returncode == 0, planted.stderr
        assert int(planted.stdout) == 0  # not one block of the attacker's
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            used = _disk_use(site.home / "spool/quarantine") + _disk_use(site.home / "logs")
            assert used < 64 << 20, f"apilogd wrote {used >> 20} MB for a segment that occupies no disk block"
            time.sleep(0.5)
    finally:
        daemon.kill()


def test_deeply_nested_messages_stall_everyone(site: Site) -> None:
    """150 records of ~3.5 KB, each a list nested 900 deep (3.2 MB once rendered), must not stall another app's entry."""
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        _another_app_logs(site, "before")
        planted = _app(site, NESTED, ROOT, "150")
        assert planted.returncode == 0, planted.stderr
        assert int(planted.stdout) < 600_000  # cheap to plant
        time.sleep(0.5)  # the daemon has picked the segment up
        _another_app_logs(site, "during")
    finally:
        daemon.kill()


@pytest.fixture
def memory_cap() -> Iterator[Path]:
    """A cgroup holding its processes to 256 MB (as MemoryMax= would; or a small host), removed afterwards."""
    v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
    group = None
    try:
        if v1.is_dir():
            group = v1 / f"apilog-attack-{os.getpid()}"
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(256 << 20))
        elif "memory" in (v2 / "cgroup.subtree_control").read_text():
            group = v2 / f"apilog-attack-{os.getpid()}"
            group.mkdir()
            (group / "memory.max").write_text(str(256 << 20))
            (group / "memory.swap.max").write_text("0")
    except OSError:
        group = None
    if group is None:
        pytest.skip("needs a memory cgroup this test may create")
    try:
        yield group / "cgroup.procs"
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_deeply_nested_messages_crash_loop_a_memory_capped_daemon(site: Site, memory_cap: Path) -> None:
    """With 256 MB for the daemon, 1 MB of nested records must not get it killed at every start (restarted as systemd does)."""
    def start() -> Daemon:
        started = site.daemon()
        memory_cap.write_text(str(started.proc.pid))
        return started

    daemon = start()
    kills = 0
    try:
        assert daemon.ready(), daemon.stderr
        planted = _app(site, NESTED, ROOT, "300")
        assert planted.returncode == 0, planted.stderr
        logged = _app(site, "from apilog import logger; logger.delay('INFO', 'ann', 'waiting', timestamp=False)")
        assert logged.returncode == 0, logged.stderr
        log = site.home / "logs/users/ann/INFO.log"
        deadline = time.monotonic() + 15
        while not log.exists():
            assert time.monotonic() < deadline, f"another app's entry is not written; apilogd was killed {kills} times"
            if daemon.proc.poll() is not None:  # Restart=on-failure
                kills += 1
                daemon.kill()
                daemon = start()
                assert daemon.ready(), daemon.stderr
            time.sleep(0.1)
    finally:
        daemon.kill()
