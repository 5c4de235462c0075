"""The daemon's own folders, opened once by descriptor and checked: home, state and the spool's parts.

Every later open, write, rename or removal goes through these descriptors (docs/reference.md, D8), so a
folder swapped for a link after start-up is never followed, and a folder the app's group
could change is refused or closed before anything is read from it.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
from dataclasses import dataclass

from apilog import spool
from apilog.core import fs
from apilog.core.folder import Folder, UnsafePath
from apilog.settings import Settings

MAX_OPEN = 16384  # log files held open at most; past them the least recently used is closed
LOG_FILES_SHARE, SEGMENTS_SHARE = 0.6, 0.2  # of the descriptor limit: thousands of users' files stay open
HOME_MODE = 0o750  # the app's group passes through to the spool; nobody else
STATE_MODE = 0o750


@dataclass
class Folders:
    """Descriptors of the folders apilogd works in, below the home (which its opener keeps)."""

    state: Folder
    spool: Folder
    segments: Folder
    tmp: Folder
    quarantine: Folder

    def close(self) -> None:
        """Close what `open_folders` opened."""
        for folder in (self.quarantine, self.tmp, self.segments, self.spool, self.state):
            folder.close()


def _own(folder: Folder, what: str, mode: int | None) -> None:
    """Refuse a folder another user owns; give ours the mode it must have (None: only never writable by others)."""
    st = folder.stat()
    if st.st_uid != os.geteuid():
        raise UnsafePath(errno.EPERM, f"{what} {folder.path} belongs to uid {st.st_uid}, not to apilogd's user "
                                        f"(uid {os.geteuid()}); fix: chown {os.geteuid()} {folder.path}")
    current = stat.S_IMODE(st.st_mode)
    wanted = current & ~0o022 if mode is None else mode
    if current != wanted:
        fs.fchmod(folder.fd, wanted)


def open_home(settings: Settings) -> Folder:
    """APILOG_HOME, created 0750 if missing, owned by us and writable by nobody else."""
    home = Folder.at(settings.home, create_mode=HOME_MODE, durable=settings.fsync != "off")
    try:
        _own(home, "APILOG_HOME", None)
    except BaseException:
        home.close()
        raise
    return home


def open_folders(settings: Settings, home: Folder) -> Folders:
    """Open (creating what is missing) and check every folder apilogd works in."""
    opened: list[Folder] = []

    def sub(parent: Folder, name: str, mode: int, what: str) -> Folder:
        folder = parent.sub(name, create_mode=mode, durable=settings.fsync != "off")
        opened.append(folder)
        _own(folder, what, mode)
        return folder

    try:
        state = sub(home, "state", STATE_MODE, "the state folder")
        spool_folder = sub(home, "spool", spool.SPOOL_MODE, "the spool")
        parts = {name: sub(spool_folder, name, mode, f"the spool's {name} folder") for name, mode in spool.MODES.items()}
    except BaseException:
        for folder in opened:
            folder.close()
        raise
    return Folders(state, spool_folder, parts["segments"], parts["tmp"], parts["quarantine"])


def descriptor_share(share: float) -> int:
    """How many descriptors log files (LOG_FILES_SHARE) or spool segments (SEGMENTS_SHARE) may hold.

    The rest is for folders, the state files, watchdog's inotify and the broker: a low
    `ulimit -n` then costs reopening files, never a stall on EMFILE.
    """
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(8, min(MAX_OPEN, int((soft if soft != resource.RLIM_INFINITY else 2 * MAX_OPEN) * share)))
