"""A hostile member of the spool group against the next start of apilogd (docs/reference.md, D7, D8), with real users."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .utils import Daemon, Site, as_user, wait_for

# The attacker's own long-lived producer: logs once, then on a line from stdin truncates its (still held) segment.
TRUNCATE_OWN = """
import os, sys, time
from apilog import logger
logger.delay('INFO', 'eve', 'mine', timestamp=False)
print('logged', flush=True)
sys.stdin.readline()
[mine] = [n for n in os.listdir('spool/segments') if n.startswith(f'{os.getpid()}-')]
os.truncate('spool/segments/' + mine, 0)  # its own file, 0640: the owner may write it
print('truncated', flush=True)
time.sleep(120)
"""

# The attacker: a segment whose name is not UTF-8 (any bytes but '/' and NUL make a file name), with good records in it.
NON_UTF8_NAME = """
import os, sys
sys.path.insert(0, sys.argv[1])
from tests.utils import record
fd = os.open(b'spool/tmp/\\xffeve.00000001.seg', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
os.write(fd, b''.join(record('INFO', 'eve', f'e{n}') for n in range(3)))
os.close(fd)
os.rename(b'spool/tmp/\\xffeve.00000001.seg', b'spool/segments/\\xffeve.00000001.seg')
"""


def _daemon(site: Site, as_root: bool) -> Daemon:
    if as_root:  # some run it as root: the home is then root's
        return Daemon(site.root, env=site.env, python=site.python, **as_user("root", site.group, 0o027))
    return site.daemon()


@pytest.fixture(params=["daemon user", "root"])
def as_root(request: pytest.FixtureRequest, site: Site) -> bool:
    if request.param == "root":
        shutil.chown(site.home, "root", site.group)
    return bool(request.param == "root")


def _app(site: Site, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*site.python, "-c", code, *args], check=False, cwd=site.home, env=site.env,
                          capture_output=True, text=True,
                          user=site.app_user, group=site.app_user, extra_groups=[site.group], umask=0o022)


def test_truncating_ones_own_held_segment_stops_the_next_start(site: Site, as_root: bool) -> None:
    """A member truncating its own held segment after it was drained must not keep apilogd from starting again."""
    daemon = _daemon(site, as_root)
    producer = None
    try:
        assert daemon.ready(), daemon.stderr
        producer = subprocess.Popen([*site.python, "-c", TRUNCATE_OWN], cwd=site.home, env=site.env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, user=site.app_user,
                                    group=site.app_user, extra_groups=[site.group], umask=0o022)
        assert producer.stdout is not None and producer.stdin is not None
        assert producer.stdout.readline().strip() == "logged"
        wait_for(lambda: (site.home / "logs/users/eve/INFO.log").exists(), what="the attacker's entry")
        time.sleep(0.3)
        producer.stdin.write("\n")
        producer.stdin.flush()
        assert producer.stdout.readline().strip() == "truncated"
        assert daemon.stop() == 0  # any restart: an upgrade, a reboot, `systemctl restart`
        daemon = _daemon(site, as_root)
        assert daemon.ready(timeout=15), f"apilogd did not start again (exit {daemon.proc.poll()}): {daemon.stderr}"
        logged = _app(site, "from apilog import logger; logger.delay('INFO', 'ann', 'after the restart', timestamp=False)")
        assert logged.returncode == 0, logged.stderr
        wait_for(lambda: (site.home / "logs/users/ann/INFO.log").exists(), timeout=10, what="an entry after the restart")
    finally:
        if producer is not None:
            producer.kill()
            producer.wait()
        daemon.stop()


def test_a_segment_with_a_non_utf8_name_after_an_unclean_stop(site: Site) -> None:
    """After an unclean stop, a segment whose name is not UTF-8 must not throttle everyone to one entry per retry."""
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        daemon.kill()  # the daemon died (OOM killer, watchdog, power cut): the next start probes inputs one by one
        planted = _app(site, NON_UTF8_NAME, str(Path(__file__).resolve().parents[1]))
        assert planted.returncode == 0, planted.stderr
        daemon = site.daemon()
        assert daemon.ready(), daemon.stderr
        logged = _app(site, "from apilog import logger\nfor n in range(30): logger.delay('INFO', 'ann', f'a{n}', "
                            "timestamp=False)")
        assert logged.returncode == 0, logged.stderr
        log = site.home / "logs/users/ann/INFO.log"
        wait_for(lambda: log.exists() and log.read_text().count("\n") == 30, timeout=10,
                 what="30 entries of another producer")
        wait_for(lambda: not os.listdir(site.home / "spool/segments"), timeout=5,
                 what="the non-UTF-8-named segment to be drained or set aside")
        assert "Traceback" not in daemon.stderr, daemon.stderr[-3000:]
    finally:
        daemon.kill()
