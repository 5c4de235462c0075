"""What waits in the spool for apilogd, as any reader sees it: whole records past the offsets apilogd committed."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from ..core.folder import Folder
from . import layout
from .frame import HEADER, whole_records

LEDGER_NAME = "ledger.json"  # in the state folder: apilogd's committed offsets, written by daemon/_ledger.py


def committed_offsets(state_dir: Path) -> dict[str, int]:
    """Each segment's committed end as of apilogd's last checkpoint; {} when there is none to read."""
    try:
        offsets = json.loads(Path(state_dir, LEDGER_NAME).read_bytes()).get("offsets", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if type(offsets) is not dict:
        return {}
    return {name: end for name, end in offsets.items() if type(end) is int and end >= 0}


def rejection(st: os.stat_result) -> str | None:
    """Why a spool entry must not be read as a segment, or None when it may."""
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_nlink != 1:
        return f"a regular file with {st.st_nlink} links (a hard link to another file?)"
    return None


def waiting(spool_dir: Path, committed: Mapping[str, int]) -> tuple[int, list[bytes]]:
    """Records waiting past the committed offsets: their count, and each segment's first waiting payload."""
    count = 0
    firsts: list[bytes] = []
    try:
        segments = Folder.at(layout(spool_dir)["segments"])
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return 0, []
    with segments:
        for name in segments.names():
            try:
                fd = segments.open_regular(name)
            except OSError:
                continue  # not a segment (a link, a folder, a FIFO...), or gone
            try:
                if rejection(os.fstat(fd)) is not None:
                    continue  # never read by the daemon either
                found, first = _count_records(fd, committed.get(name, 0))
            finally:
                os.close(fd)
            count += found
            if first is not None:
                firsts.append(first)
    return count, firsts


def _count_records(fd: int, pos: int) -> tuple[int, bytes | None]:
    """Whole records from `pos` on, and the first one's payload."""
    count, first = 0, None
    for start, end in whole_records(fd, pos, os.fstat(fd).st_size):
        if first is None:
            first = os.pread(fd, end - start - HEADER.size, start + HEADER.size)
        count += 1
    return count, first
