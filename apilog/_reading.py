"""Reading the log tree back: entries parsed from live files and gzip archives, in order."""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ._render import STAMP_FORMAT
from ._tree import (
    ARCHIVE,
    SYSTEM,
    USERS,
    archive_order,
    decode_user,
    encode_user,
    parse_archive_name,
)
from .settings import Settings

_START = re.compile(r"^(?P<stream>[A-Z0-9_-]+(?: [A-Z0-9_-]+)*):(?: |  )")
_STAMP = re.compile(r" \u00a7 \[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]$")
_RELATIVE = re.compile(r"^(\d+)([smhd])$")


@dataclass(frozen=True, slots=True)
class Written:
    """One entry as found in a file: its stream, its event time if it carries one, and its text as written."""

    stream: str
    ts: float | None
    text: str
    source: str  # the file, relative to the log root


def user_dir(location: str) -> str:
    """The folder, relative to the log root, that holds `location`'s files."""
    return SYSTEM if location == SYSTEM else f"{USERS}/{encode_user(location)}"


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
    stem = stream.replace(" ", "_") if stream else None
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


def read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def parse(text: str, source: str, settings: Settings) -> Iterator[Written]:
    """Entries of one file, text or jsonl; a multi-line text entry runs until the next entry's first line."""
    if settings.format == "jsonl":
        for line in text.splitlines():
            try:
                record = json.loads(line)
                yield Written(record["stream"], datetime.fromisoformat(record["ts"]).timestamp(), line + "\n", source)
            except (ValueError, KeyError, TypeError):
                continue
        return
    lines: list[str] = []
    stream = ""
    for line in text.splitlines(keepends=True):
        match = _START.match(line)
        if match and lines:
            yield _entry(stream, lines, source, settings)
            lines = []
        if match and not lines:
            stream = match["stream"]
        lines.append(line)
    if lines:
        yield _entry(stream, lines, source, settings)


def _entry(stream: str, lines: list[str], source: str, settings: Settings) -> Written:
    match = _STAMP.search(lines[-1].rstrip("\n"))
    ts = None
    if match:
        when = datetime.strptime(match.group(1), STAMP_FORMAT)  # noqa: DTZ007 - the zone is the settings', applied below
        ts = (when.replace(tzinfo=settings.tz) if settings.tz else when).timestamp()
    return Written(stream, ts, "".join(lines), source)


def entries(settings: Settings, paths: list[Path], texts: Mapping[Path, str] | None = None) -> Iterator[Written]:
    """Entries of `paths` in order; `texts` gives some files' content already read."""
    for path in paths:
        text = texts[path] if texts and path in texts else read_text(path)
        yield from parse(text, str(path.relative_to(settings.log_dir)), settings)


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
