"""A hostile member of the spool group against what apilogd quarantined for another producer, with real users."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .utils import Site, wait_for

SEGMENT = "4242-0badc0de.00000001.seg"

# The victim: a producer that died in the middle of a write leaves a torn record at the end of its segment.
TORN = f"""
import os, sys
sys.path.insert(0, sys.argv[1])
from tests.utils import record
whole = record('INFO', 'vic', 'before the crash')
open('spool/tmp/{SEGMENT}', 'wb').write(whole + whole[:40] + b'VICTIM-TORN-TAIL')
os.rename('spool/tmp/{SEGMENT}', 'spool/segments/{SEGMENT}')  # published whole, as a producer that died
print(len(whole))
"""

# The attacker, once the victim's segment is drained and removed: a file of its own under the same name,
# with damaged bytes at the same offset.
SAME_NAME = f"""
import os, sys
offset = int(sys.argv[1])
open('spool/tmp/{SEGMENT}', 'wb').write(b'x' * offset + b'APL1' + b'\\xff' * 8 + b'ATTACKER')
os.rename('spool/tmp/{SEGMENT}', 'spool/segments/{SEGMENT}')
"""


def _run(site: Site, user: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*site.python, "-c", code, *args], check=False, cwd=site.home, env=site.env,
                          capture_output=True, text=True,
                          user=user, group=user, extra_groups=[site.group], umask=0o022)


def test_a_member_cannot_replace_what_was_quarantined_for_another_producer(site: Site) -> None:
    """Reusing a drained segment's name must not overwrite the victim's quarantined bytes with the attacker's."""
    victim = f"alo{str(os.getpid())[-5:]}"  # made by two_users; put in the spool group here
    subprocess.run(["usermod", "-aG", site.group, victim], check=True)
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        torn = _run(site, victim, TORN, str(Path(__file__).resolve().parents[1]))
        assert torn.returncode == 0, torn.stderr
        offset = int(torn.stdout)
        quarantine = site.home / "spool/quarantine"
        wait_for(lambda: any(b"VICTIM-TORN-TAIL" in p.read_bytes() for p in quarantine.iterdir()),
                 what="the victim's torn record in quarantine")
        wait_for(lambda: not (site.home / "spool/segments" / SEGMENT).exists(), what="the victim's segment removed")
        planted = _run(site, site.app_user, SAME_NAME, str(offset))
        assert planted.returncode == 0, planted.stderr
        wait_for(lambda: any(b"ATTACKER" in p.read_bytes() for p in quarantine.iterdir()),
                 what="the attacker's bytes in quarantine")
        assert any(b"VICTIM-TORN-TAIL" in p.read_bytes() for p in quarantine.iterdir()), \
            f"the victim's quarantined bytes were replaced: {sorted(os.listdir(quarantine))}"
    finally:
        assert daemon.stop() == 0
