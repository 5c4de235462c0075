"""A hostile member of the spool group against another producer's next segments (docs/reference.md, D8), with real users."""

from __future__ import annotations

import os
import subprocess

from .utils import Site, wait_for

# The attacker: reads another producer's id from segments/ and takes the names of its next segments in tmp/.
TAKE_NAMES = """
import os, sys
producer = sys.argv[1].split('.')[0]
for seq in range(2, 200):
    open(f'spool/tmp/{producer}.{seq:08d}.seg', 'w').close()
"""

# The victim: a long-lived app process; on a line from stdin it logs past a segment's 8 MB, then one more entry.
VICTIM = """
import sys
from apilog import logger
logger.delay('INFO', 'vic', 'first', timestamp=False)
print('logged', flush=True)
sys.stdin.readline()
for _ in range(150):
    logger.delay('DEBUG', 'vic', 'x' * 60000, timestamp=False)
logger.delay('INFO', 'vic', 'after the roll', timestamp=False)
print('logged', flush=True)
"""


def test_a_member_taking_a_producers_next_names_stops_its_spooling(site: Site) -> None:
    """Files the attacker creates under another producer's next segment names must not stop that producer's entries."""
    victim = f"alo{str(os.getpid())[-5:]}"  # made by two_users; put in the spool group here
    subprocess.run(["usermod", "-aG", site.group, victim], check=True)
    daemon = site.daemon()
    app = None
    try:
        assert daemon.ready(), daemon.stderr
        app = subprocess.Popen([*site.python, "-c", VICTIM], cwd=site.home, env=site.env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, user=victim,
                               group=victim, extra_groups=[site.group], umask=0o022)
        assert app.stdout is not None and app.stdin is not None
        assert app.stdout.readline().strip() == "logged"
        log = site.home / "logs/users/vic/INFO.log"
        wait_for(lambda: log.exists() and "first" in log.read_text(), what="the victim's first entry")
        [theirs] = os.listdir(site.home / "spool/segments")
        taken = subprocess.run([*site.python, "-c", TAKE_NAMES, theirs], check=False, cwd=site.home, env=site.env,
                               capture_output=True, text=True, user=site.app_user, group=site.app_user,
                               extra_groups=[site.group], umask=0o022)
        assert taken.returncode == 0, taken.stderr
        app.stdin.write("\n")
        app.stdin.flush()
        assert app.stdout.readline().strip() == "logged"
        wait_for(lambda: "after the roll" in log.read_text(), timeout=10, what="the victim's entry after its roll")
    finally:
        if app is not None:
            app.kill()
            app.wait()
        assert daemon.stop() == 0
