"""docs/reference.md, D8 with real users: the app's group may add records to the spool and nothing more."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from .utils import Site, as_user, log_file, record, wait_for


def test_the_group_cannot_rename_replace_or_plant(site: Site) -> None:
    """Spool folders, state, pidfile and registry: a group member can neither swap, plant, delete nor write them."""
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        assert site.app_logs("from apilog import logger; logger.delay('INFO', 'ivy', 'hi', timestamp=False)").returncode == 0
        home = site.home
        wait_for(lambda: (home / "logs/users/ivy/INFO.log").exists(), what="the app's entry")
        # A file another user of the group dropped into tmp/ (as a producer does first): the sticky bit keeps it theirs.
        theirs = subprocess.run(["sh", "-c", "echo x > spool/tmp/9-theirs.00000001.seg"], cwd=home,
                                **as_user(site.daemon_user, site.group, 0o007))
        assert theirs.returncode == 0
        for attack in (
            "mv spool/segments spool/old", "mv spool/quarantine spool/old", "mv spool/tmp spool/old",
            "ln -s /etc spool/evil", "mv state state.old", "echo '{}' > state/ledger.json",
            "ln -s /etc/passwd state/ledger.json.x", "echo 1 > apilogd.pid", "mv apilogd.pid apilogd.old",
            "echo '{\"streams\": []}' > streams.json", "echo x > spool/quarantine/planted",
            "rm -f spool/tmp/9-theirs.00000001.seg", "mv spool/tmp/9-theirs.00000001.seg spool/segments/y",
        ):
            result = site.as_app(attack)
            assert result.returncode != 0, f"the app's user could: {attack}"
        assert (home / "spool" / "tmp" / "9-theirs.00000001.seg").exists()
        modes = {p: stat.S_IMODE(os.lstat(home / p).st_mode) for p in ("", "state", "spool", "spool/segments",
                                                                       "spool/tmp", "spool/quarantine", "apilogd.pid")}
        assert modes["spool/segments"] == modes["spool/tmp"] == 0o3770  # group-writable only with the sticky bit
        assert all(mode & 0o022 == 0 for p, mode in modes.items() if p not in ("spool/segments", "spool/tmp")), modes
    finally:
        assert daemon.stop() == 0


def test_a_legacy_group_writable_home_is_closed_at_start(site: Site) -> None:
    """A home left 2770 by an older install: the daemon takes group write away before reading anything."""
    os.chmod(site.home, 0o2770)
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        assert stat.S_IMODE(site.home.stat().st_mode) & 0o022 == 0
        assert site.as_app("mkdir state2").returncode != 0
    finally:
        assert daemon.stop() == 0


def test_producers_of_any_umask_and_unreadable_segments(site: Site) -> None:
    """umask 077 still gives the daemon a readable segment; a segment made unreadable on purpose is reported, not fatal."""
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        private = site.app_logs("from apilog import logger; logger.delay('INFO', 'jon', 'umask 077', timestamp=False)",
                                umask=0o077)
        assert private.returncode == 0, private.stderr
        wait_for(lambda: (site.home / "logs/users/jon/INFO.log").exists(), what="the umask-077 entry")
        assert log_file(site.home, "users/jon/INFO.log") == "INFO:  umask 077\n"
        # A producer's segment made 0600 before it is published (made unreadable after, the daemon may have it open
        # already): written and locked as a producer does, then renamed into segments/.
        locked = site.app_logs(
            "import fcntl, os, time\nfrom apilog import logger\nfrom apilog.core import wire\n"
            "from apilog.core.entry import build\nfrom apilog.core.streams import Registry\n"
            "from apilog.spool.frame import frame\nfrom pathlib import Path\n"
            "entry, _ = build('INFO', 'kim', 'hidden', timestamp=False, registry=Registry(Path('.')),"
            " timestamps_default=False, max_entry_bytes=65536)\n"
            "name = f'{os.getpid()}-hidden.00000001.seg'\n"
            "fd = os.open('spool/tmp/' + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, frame(wire.encode(entry)))\n"
            "os.rename('spool/tmp/' + name, 'spool/segments/' + name)\ntime.sleep(3)")
        assert locked.returncode == 0, locked.stderr
        later = site.app_logs("from apilog import logger; logger.delay('INFO', 'lou', 'later', timestamp=False)")
        assert later.returncode == 0
        wait_for(lambda: (site.home / "logs/users/lou/INFO.log").exists(), what="an entry after the unreadable segment")
        internal = site.home / "logs/system/INTERNAL.log"
        wait_for(lambda: internal.exists() and "Permission denied" in internal.read_text(), what="the report")
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0


def test_a_folder_swapped_for_a_link_is_never_followed(daemon: Path, tmp_path: Path) -> None:
    """Even swapped by someone who can (root), quarantine/ and segments/ are reached through the folders first opened."""
    spool = daemon / "spool"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "1-victim.00000001.seg").write_bytes(record("INFO", "vic", "another user's data"))
    os.rename(spool / "quarantine", spool / "quarantine.real")
    os.rename(spool / "segments", spool / "segments.real")
    (spool / "quarantine").symlink_to(victim)
    (spool / "segments").symlink_to(victim)
    fd = os.open(spool / "segments.real" / "2-real.00000001.seg", os.O_WRONLY | os.O_CREAT, 0o640)
    os.write(fd, b"garbage to quarantine" + record("INFO", "wes", "through the real folder"))
    os.close(fd)
    wait_for(lambda: (daemon / "logs/users/wes/INFO.log").exists(), what="the entry in the real folder")
    wait_for(lambda: len(list((spool / "quarantine.real").iterdir())) == 1, what="the garbage in the real quarantine")
    assert sorted(p.name for p in victim.iterdir()) == ["1-victim.00000001.seg"]
    assert not (daemon / "logs" / "users" / "vic").exists()
    os.unlink(spool / "segments")
    os.rename(spool / "segments.real", spool / "segments")  # so the fixture's stop sees the spool it knows
    os.unlink(spool / "quarantine")
    os.rename(spool / "quarantine.real", spool / "quarantine")



def test_a_folder_the_daemon_may_not_write_sends_its_entries_to_internal(site: Site) -> None:
    """EACCES on one user's folder (root took it): that user's entries go to INTERNAL with their text; others land."""
    locked = site.home / "logs" / "users" / "yan"
    locked.mkdir(parents=True)
    for folder in (site.home / "logs", site.home / "logs" / "users"):
        shutil.chown(folder, site.daemon_user, site.group)
        os.chmod(folder, 0o750)
    os.chmod(locked, 0o700)  # root's, closed to the daemon's user
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        logged = site.app_logs("from apilog import logger\nlogger.delay('INFO', 'yan', 'to the closed folder', "
                               "timestamp=False)\nlogger.delay('INFO', 'zoe', 'to an open one', timestamp=False)")
        assert logged.returncode == 0, logged.stderr
        internal = site.home / "logs" / "system" / "INTERNAL.log"
        wait_for(lambda: (site.home / "logs/users/zoe/INFO.log").exists() and internal.exists()
                 and "to the closed folder" in internal.read_text(), what="both entries")
        assert log_file(site.home, "users/zoe/INFO.log") == "INFO:  to an open one\n"
        text = internal.read_text()
        assert "cannot write users/yan/INFO.log: Permission denied" in text and "to the closed folder" in text
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0
