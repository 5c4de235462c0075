"""The durable filesystem spool: producers append framed records to segment files, apilogd drains them.

Who may do what (docs/reference.md, D8): the app's group may only add files to `segments/` and `tmp/`,
and update the limits table in `limits/` (docs/operations.md, "Limits"); these carry the sticky bit so
nobody removes or renames a file they do not own; `spool/` itself and `quarantine/` are the
daemon's alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.folder import sync_folder

SPOOL_MODE = 0o2750  # the group may enter, not change; setgid hands the group down
DROP_MODE = 0o3770  # segments/ and tmp/: the group adds files; sticky: only a file's owner removes it
QUARANTINE_MODE = 0o2750
SEGMENT_MODE = 0o640

# limits/: the producers' shared table (limits.py), created by whoever comes first and updated by every producer.
MODES = {"segments": DROP_MODE, "tmp": DROP_MODE, "limits": DROP_MODE, "quarantine": QUARANTINE_MODE}


def layout(spool_dir: Path) -> dict[str, Path]:
    """The spool's folders by role."""
    return {name: spool_dir / name for name in MODES}


def ensure(spool_dir: Path, *, durable: bool = False) -> dict[str, Path]:
    """Create what is missing of the spool (the producer's side, by path; `durable`: each new folder's parent synced, so
    that a power cut cannot take it away with the segments then made in it); return its folders by role."""
    dirs = layout(spool_dir)
    for path, mode in ((spool_dir, SPOOL_MODE), *((dirs[name], MODES[name]) for name in MODES)):
        try:
            os.mkdir(path, mode)
        except FileNotFoundError:
            os.makedirs(path.parent, exist_ok=True)
            os.mkdir(path, mode)
        except FileExistsError:
            continue
        os.chmod(path, mode)  # mkdir's mode passes through the umask; the setgid and sticky bits too
        if durable:
            sync_folder(path.parent)
    return dirs
