"""The durable filesystem spool: producers append framed records to segment files, apilogd drains them."""

from __future__ import annotations

import os
from pathlib import Path

SPOOL_MODE = 0o2770  # group-shared between the app's user and the daemon's, setgid
SEGMENT_MODE = 0o640


def layout(spool_dir: Path) -> dict[str, Path]:
    """The spool's folders by role."""
    return {
        "segments": spool_dir / "segments",
        "tmp": spool_dir / "tmp",
        "quarantine": spool_dir / "quarantine",
    }


def ensure(spool_dir: Path) -> dict[str, Path]:
    """Create the spool's folders (2770) if missing; return them by role."""
    dirs = layout(spool_dir)
    for path in (spool_dir, *dirs.values()):
        try:
            os.mkdir(path, SPOOL_MODE)
        except FileNotFoundError:
            os.makedirs(path.parent, exist_ok=True)
            os.mkdir(path, SPOOL_MODE)
        except FileExistsError:
            continue
        os.chmod(path, SPOOL_MODE)  # mkdir's mode passes through the umask; the setgid bit too
    return dirs
