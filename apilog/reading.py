"""Reading the log tree back, for the `apilog` commands and the web view: files found, opened without following a
link, gzip archives unpacked within a bound, entries parsed in order."""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .core.logfile import ARCHIVE, USERS, Written, archive_order, decode_user, file_stem, parse, parse_archive_name, user_dir
from .core.tree import GZIP_MAGIC, LogTree
from .settings import Settings

_RELATIVE = re.compile(r"^(\d+)([smhd])$")


def users(settings: Settings) -> list[str]:
    """Every user with live or archived logs, decoded."""
    names: set[str] = set()
    for folder in (settings.log_dir / USERS, settings.log_dir / ARCHIVE / USERS):
        if folder.is_dir():
            names.update(decode_user(p.name) for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
    return sorted(names)


def files_of(settings: Settings, location: str, stream: str | None = None) -> list[Path]:
    """A user's files in order, oldest first: for each stream its archives by rotation, then the live file."""
    folder = user_dir(location)
    stem = file_stem(stream) if stream else None
    found = [p for p in archives(settings.log_dir / ARCHIVE / folder) if stem is None or p.name.split(".", 1)[0] == stem]
    live = settings.log_dir / folder
    if live.is_dir():
        found += sorted(p for p in live.iterdir() if p.suffix == settings.log_suffix
                        and (stem is None or p.stem == stem) and not p.is_symlink())
    return found


def archives(folder: Path) -> list[Path]:
    """A folder's archives in rotation order: gzipped ones, and plain ones not compressed yet
    (a rotation moments ago, or a compression a crash cut short); never a `.tmp`."""
    if not folder.is_dir():
        return []
    names = set(os.listdir(folder))
    chosen = []
    for name in names:
        match = parse_archive_name(name)
        if match is None or match["tmp"] or (folder / name).is_symlink():
            continue
        if match["gz"] or name + ".gz" not in names:  # a finished .gz wins over its plain copy
            chosen.append(name)
    return [folder / n for n in sorted(chosen, key=archive_order)]


def unpack_limit(settings: Settings) -> int:
    """How many bytes an archive may unpack to when read back: a real one holds about APILOG_ROTATE_BYTES."""
    return max(64 << 20, 4 * settings.rotate_bytes)


def read_text(tree: LogTree, path: Path, limit: int) -> str:
    """A file's text; an archive's gzip is told by its bytes (halfway through its switch to .gz it has the plain name)."""
    relpath = str(path.relative_to(tree.root))
    try:
        with tree.reader(relpath) as handle:
            packed = handle.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    except FileNotFoundError:
        match = parse_archive_name(path.name)
        if match is None or match["gz"]:
            raise
        relpath, packed = relpath + ".gz", True  # switched to its .gz since it was listed
    if packed:
        return unpack(tree, relpath, limit).decode("utf-8", errors="replace")
    with tree.reader(relpath) as handle:
        return handle.read().decode("utf-8", errors="replace")


def unpack(tree: LogTree, relpath: str, limit: int) -> bytes:
    """An archive's content, at most `limit` bytes of it (a gzip bomb planted in the tree stops there)."""
    try:
        with tree.reader(relpath, unpacked=True) as unpacked:
            return unpacked.read(limit)
    except (OSError, EOFError, gzip.BadGzipFile):
        return b""


def entries(settings: Settings, paths: list[Path], texts: Mapping[Path, str] | None = None) -> Iterator[Written]:
    """Entries of `paths` in order; `texts` gives some files' content already read."""
    tree = LogTree(settings.log_dir)
    try:
        for path in paths:
            text = texts[path] if texts and path in texts else read_text(tree, path, unpack_limit(settings))
            yield from parse(text, str(path.relative_to(settings.log_dir)), settings.format, settings.tz)
    finally:
        tree.close()


def merged(settings: Settings, paths: list[Path], texts: Mapping[Path, str] | None = None) -> list[Written]:
    """Entries of several files merged by event time (entries without one keep their place in their file)."""
    by_file = [list(entries(settings, [p], texts)) for p in paths]
    keyed = []
    for rank, items in enumerate(by_file):
        last = float("-inf")
        for n, item in enumerate(items):
            last = item.ts if item.ts is not None else last
            keyed.append((last, rank, n, item))
    return [item for *_, item in sorted(keyed, key=lambda k: k[:3])]


def since(value: str) -> float:
    """`--since`: an ISO date or time (UTC unless it says), or an age like 30m, 2h, 7d."""
    match = _RELATIVE.match(value.strip())
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
        return (datetime.now(UTC) - timedelta(seconds=int(match[1]) * unit)).timestamp()
    when = datetime.fromisoformat(value.strip())
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
