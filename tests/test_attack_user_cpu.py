"""A hostile member of the spool group against apilogd's CPU while nothing is logged (docs/reference.md, D7), with real users."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from .utils import Site, wait_for

HELD = 12000

# The attacker: 12,000 producers' worth of segments, one record each, all held open (locked) by one process.
HOLD_MANY = f"""
import fcntl, os, sys, time
sys.path.insert(0, sys.argv[1])
from tests.utils import record
one = record('INFO', 'eve', 'x')
held = []
for n in range({HELD}):
    name = f'{{n}}-held.00000001.seg'
    fd = os.open('spool/tmp/' + name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, one)
    os.rename('spool/tmp/' + name, 'spool/segments/' + name)
    held.append(fd)
print('held', flush=True)
time.sleep(120)
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_segments_held_open_make_an_idle_daemon_spin(site: Site) -> None:
    """Once every record is written, 12,000 segments a member holds open must not keep apilogd busy on a core."""
    site.env.pop("COVERAGE_PROCESS_CONFIG", None)  # the CPU measured is the daemon's, not a coverage tracer's
    daemon = site.daemon()
    attacker = None
    try:
        assert daemon.ready(), daemon.stderr
        attacker = subprocess.Popen([*site.python, "-c", HOLD_MANY, str(Path(__file__).resolve().parents[1])],
                                    cwd=site.home, env=site.env, text=True, stdout=subprocess.PIPE,
                                    user=site.app_user, group=site.app_user, extra_groups=[site.group], umask=0o022)
        assert attacker.stdout is not None and attacker.stdout.readline().strip() == "held"
        log = site.home / "logs/users/eve/INFO.log"
        wait_for(lambda: log.exists() and log.read_text().count("\n") == HELD, what="every held segment's record")
        time.sleep(1)
        before = _cpu_seconds(daemon.proc.pid)
        time.sleep(4)
        busy = (_cpu_seconds(daemon.proc.pid) - before) / 4
        assert busy < 0.25, f"apilogd used {busy:.0%} of a CPU over 4 s with nothing to write"
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.wait()
        assert daemon.stop() == 0
