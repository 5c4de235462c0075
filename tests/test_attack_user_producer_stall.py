"""A hostile member of the spool group against another producer's draining (docs/reference.md, D7, D8), with real users."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .utils import Site, wait_for

# The attacker: takes an exclusive flock on a file it opened read-only (the group may read every segment).
LOCK_THEIRS = """
import fcntl, os, sys, time
name = sys.argv[1]
fd = os.open('spool/segments/' + name, os.O_RDONLY)
print('waiting', flush=True)
fcntl.flock(fd, fcntl.LOCK_EX)  # granted the moment the producer seals it (closes it on its roll)
print('locked', flush=True)
time.sleep(120)
"""

# The attacker: a segment of its own named after another producer, with a lower sequence number, held open.
SQUAT = """
import fcntl, os, sys, time
producer = sys.argv[1].split('.')[0]
fd = os.open('spool/tmp/squat', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
fcntl.flock(fd, fcntl.LOCK_EX)
os.rename('spool/tmp/squat', f'spool/segments/{producer}.00000000.seg')
print('squatted', flush=True)
time.sleep(120)
"""

# The victim: a long-lived app process; it logs once, then again on each line read from stdin.
VICTIM = """
import sys
from apilog import logger
logger.delay('INFO', 'vic', 'first', timestamp=False)
print('logged', flush=True)
for line in sys.stdin:
    if line.strip() == 'roll':  # more than a segment's 8 MB: the writer seals its segment and opens the next
        for _ in range(150):
            logger.delay('DEBUG', 'vic', 'x' * 60000, timestamp=False)
    else:
        logger.delay('INFO', 'vic', line.strip(), timestamp=False)
    print('logged', flush=True)
"""


@pytest.fixture
def victim(site: Site) -> str:
    """A second app user in the spool group (two_users made it; it is removed with them)."""
    name = f"alo{str(os.getpid())[-5:]}"
    subprocess.run(["usermod", "-aG", site.group, name], check=True)
    return name


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def _spawn(site: Site, user: str, code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*site.python, "-c", code, *args], cwd=site.home, env=site.env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            user=user, group=user, extra_groups=[site.group], umask=0o022)


def _logged(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text()


def test_a_member_squatting_a_producers_name_stalls_it(site: Site, victim: str,
                                                       procs: list[subprocess.Popen[str]]) -> None:
    """A segment the attacker names `<victim's producer id>.00000000.seg` and holds open must not stall the victim."""
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        app = _spawn(site, victim, VICTIM)
        procs.append(app)
        assert app.stdout is not None and app.stdout.readline().strip() == "logged"
        log = site.home / "logs/users/vic/INFO.log"
        wait_for(lambda: _logged(log, "first"), what="the victim's first entry")
        [theirs] = os.listdir(site.home / "spool/segments")
        attacker = _spawn(site, site.app_user, SQUAT, theirs)
        procs.append(attacker)
        assert attacker.stdout is not None and attacker.stdout.readline().strip() == "squatted"
        assert app.stdin is not None
        app.stdin.write("second\n")
        app.stdin.flush()
        assert app.stdout.readline().strip() == "logged"
        wait_for(lambda: _logged(log, "second"), timeout=10, what="the victim's entry after the squat")
    finally:
        assert daemon.stop() == 0


def test_a_member_locking_a_producers_sealed_segment_stalls_it(site: Site, victim: str,
                                                               procs: list[subprocess.Popen[str]]) -> None:
    """An flock the attacker takes on another producer's segment as it is sealed must not hold up that producer's next one."""
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        app = _spawn(site, victim, VICTIM)
        procs.append(app)
        assert app.stdout is not None and app.stdout.readline().strip() == "logged"
        log = site.home / "logs/users/vic/INFO.log"
        wait_for(lambda: _logged(log, "first"), what="the victim's first entry")
        [theirs] = os.listdir(site.home / "spool/segments")
        attacker = _spawn(site, site.app_user, LOCK_THEIRS, theirs)
        procs.append(attacker)
        assert attacker.stdout is not None and attacker.stdout.readline().strip() == "waiting"
        assert app.stdin is not None
        for line in ("roll", "after the roll"):
            app.stdin.write(line + "\n")
            app.stdin.flush()
            assert app.stdout.readline().strip() == "logged"
        wait_for(lambda: _logged(log, "after the roll"), timeout=10, what="the victim's entry in its next segment")
    finally:
        assert daemon.stop() == 0
