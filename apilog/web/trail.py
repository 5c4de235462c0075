"""What the web view reads: the users and their summaries, a user's trail newest first in pages, search and activity.

Nothing here loads a whole history: a page of a trail is read backwards from the end of each
stream's files (a gzip archive is unpacked only when a page reaches it, and a few are kept), and a
page of users reads only those users' files. Every path comes from listing the tree itself, and a
user's folder from the tree's own encoder: nothing a request says can point outside the tree.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from apilog.core.logfile import ARCHIVE, SYSTEM, USERS, BadLocation, decode_user, encode_user, parse, parse_archive_name, user_dir
from apilog.core.tree import GZIP_MAGIC, LogTree
from apilog.reading import archives, unpack, unpack_limit
from apilog.settings import Settings

_TEXT_START = re.compile(rb"^[A-Z0-9_-]+(?: [A-Z0-9_-]+)*:(?: |  )", re.MULTILINE)
# An entry's own stamp, and its hour: the end of an entry (the next line starts one, or the file ends), never
# a stamp-like text a message or heading carries. In jsonl, the record's own "ts", right after its id.
_TEXT_HOUR = re.compile(" \u00a7 \\[(\\d{4}-\\d\\d-\\d\\d \\d\\d):\\d\\d:\\d\\d\\]\n".encode()
                        + rb"(?=[A-Z0-9_-]+(?: [A-Z0-9_-]+)*:(?: |  )|\Z)")
_JSONL_HOUR = re.compile(rb'^\{"id":"[^"\\]*","ts":"(\d{4}-\d\d-\d\dT\d\d)', re.MULTILINE)
ALERTS = ("SECURITY ALERT", "STRANGE ACTIVITY")
ACTIVITY_CHUNK = 1 << 20
SEARCH_SECONDS = 2.0  # a search stops here and says its results are partial
UNPACKED_KEPT = 4  # gzip archives kept unpacked between requests (a user's older pages)
WINDOW = 64 * 1024  # first read back from a file's end
TAIL_MAX = 1 << 20  # at most this much of a file is sent by one live-tail answer
MAX_CURSOR = 8192  # characters of a page cursor (a few streams' file names and offsets)


@dataclass(frozen=True)
class Item:
    """An entry as the pages show it: its text exactly as written."""

    stream: str
    ts: float | None
    text: str
    file: str  # relative to the log root
    start: int  # where it begins in its file (its content, for an archive)


@dataclass
class UserSummary:
    name: str
    last_activity: float
    counts: dict[str, int] = field(default_factory=dict)


class Trail:
    """The log tree as the web view reads it (one per server; safe to share between request threads)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.log_dir
        self.tree = LogTree(settings.log_dir)
        # An archive is at most a rotation's worth; anything much larger was not written by apilogd.
        self.unpack_limit = unpack_limit(settings)
        self.starts = _TEXT_START if settings.format == "text" else re.compile(rb"^", re.MULTILINE)
        self.stamps = _TEXT_HOUR if settings.format == "text" else _JSONL_HOUR
        self._unpacked: OrderedDict[str, bytes] = OrderedDict()
        self._counts: dict[tuple[str, int, int], int] = {}  # (file, size, mtime) -> entries
        self._lock = threading.Lock()

    # Users.

    def folder(self, name: str) -> str | None:
        """The user's folder relative to the root (`system` for the system), or None when there is no such user."""
        try:
            folder = user_dir(name)
        except BadLocation:
            return None
        if name != SYSTEM and decode_user(encode_user(name)) != name:
            return None
        live, old = self.root / folder, self.root / ARCHIVE / folder
        return folder if _is_dir(live) or _is_dir(old) else None

    def users(self) -> list[tuple[str, float]]:
        """Every user (and `system`) with their last activity (newest file change), most recent first."""
        found: dict[str, float] = {}
        for base in (self.root / USERS, self.root / ARCHIVE / USERS):
            for entry in _scandir(base):
                if entry.is_dir(follow_symlinks=False):
                    name = decode_user(entry.name)
                    found[name] = max(found.get(name, 0.0), _newest(Path(entry.path)))
        for base in (self.root / SYSTEM, self.root / ARCHIVE / SYSTEM):
            if _is_dir(base):
                found[SYSTEM] = max(found.get(SYSTEM, 0.0), _newest(base))
        return sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))

    def summary(self, name: str, last_activity: float) -> UserSummary:
        """A user's counts of entries by stream (archives counted once, then remembered)."""
        out = UserSummary(name, last_activity)
        for stream, files in self.streams(name).items():
            out.counts[stream] = sum(self._count(path) for path in files)
        return out

    def streams(self, name: str) -> dict[str, list[Path]]:
        """A user's files by stream name, oldest first: archives in rotation order, then the live file."""
        folder = self.folder(name)
        if folder is None:
            return {}
        suffix = self.settings.log_suffix
        out: dict[str, list[Path]] = {}
        if _plain_folder(self.root, f"{ARCHIVE}/{folder}"):
            for path in archives(self.root / ARCHIVE / folder):
                out.setdefault(_stream_of(path.name), []).append(path)
        for entry in _scandir(self.root / folder) if _plain_folder(self.root, folder) else []:
            if entry.name.endswith(suffix) and entry.is_file(follow_symlinks=False):
                out.setdefault(_stream_of(entry.name), []).append(Path(entry.path))
        return dict(sorted(out.items()))

    # A trail, newest first. These take a user's `streams()`, listed once per request.

    def page(self, every: dict[str, list[Path]], streams: set[str] | None, limit: int, cursor: str | None = None,
             since: float | None = None) -> tuple[list[Item], str | None]:
        """Up to `limit` entries older than `cursor`, newest first, merged by time; and the cursor of the next page."""
        files = {s: f for s, f in every.items() if streams is None or s in streams}
        position = decode_cursor(cursor, files, self.root)
        taken: list[Item] = []
        heads = [list(itertools.islice(self._backwards(paths, position.get(stream)), limit))
                 for stream, paths in files.items()]
        merged = sorted((item for items in heads for item in items),
                        key=lambda i: (i.ts if i.ts is not None else float("-inf")), reverse=True)
        for item in merged:
            if len(taken) == limit or (since is not None and item.ts is not None and item.ts < since):
                break
            taken.append(item)
        if len(taken) < limit:
            return taken, None  # nothing older left (or nothing since `since`)
        last: dict[str, list[object]] = {s: [str(p.relative_to(self.root)), at] for s, (p, at) in position.items()}
        for item in taken:
            last[item.stream] = [item.file, item.start]
        return taken, encode_cursor(last)

    def _backwards(self, paths: list[Path], position: tuple[Path, int] | None) -> Iterator[Item]:
        """A stream's entries newest first, from `position` (a file and an offset) or from its live end."""
        index, end = len(paths) - 1, None
        if position is not None:
            index, end = paths.index(position[0]), position[1]
        while index >= 0:
            path = paths[index]
            data = self._content(path)
            end = len(data) if end is None else min(end, len(data))
            yield from self._entries_back(data, end, path)
            index, end = index - 1, None

    def _entries_back(self, data: bytes | _File, end: int, path: Path) -> Iterator[Item]:
        source = str(path.relative_to(self.root))
        window = WINDOW
        while end > 0:
            lo = max(0, end - window)
            chunk = data[lo:end]
            starts = [m.start() for m in self.starts.finditer(chunk) if m.start() > 0 or lo == 0]
            if lo == 0 and (not starts or starts[0] > 0):
                starts.insert(0, 0)  # bytes before the first entry (a damaged file): shown as they are
            if lo > 0 and len(starts) < 2:
                window *= 4  # an entry longer than the window: read further back
                continue
            if lo > 0:
                starts = starts[1:] if starts[0] == 0 else starts  # the first may be cut: taken with the next window
            cut = [*starts, len(chunk)]
            for begin, stop in reversed(list(itertools.pairwise(cut))):
                text = chunk[begin:stop].decode("utf-8", "replace")
                for written in parse(text, source, self.settings.format, self.settings.tz):
                    yield Item(written.stream, written.ts, written.text, source, lo + begin)
            end = lo + starts[0]
            window = WINDOW

    def _content(self, path: Path) -> bytes | _File:
        """A plain file read where asked; an archive unpacked whole (a few kept)."""
        if self._packed(path):
            key = str(path)
            with self._lock:
                if key in self._unpacked:
                    self._unpacked.move_to_end(key)
                    return self._unpacked[key]
            data = unpack(self.tree, str(path.relative_to(self.tree.root)), self.unpack_limit)
            with self._lock:
                self._unpacked[key] = data
                while len(self._unpacked) > UNPACKED_KEPT:
                    self._unpacked.popitem(last=False)
            return data
        return _File(self.tree, path)

    def _packed(self, path: Path) -> bool:
        """An archive's gzip: a .gz, or a plain name holding gzip bytes (halfway through the archive's switch to .gz)."""
        if path.name.endswith(".gz"):
            return True
        return parse_archive_name(path.name) is not None and _File(self.tree, path)[0:len(GZIP_MAGIC)] == GZIP_MAGIC

    def _count(self, path: Path) -> int:
        try:
            st = path.stat()
        except OSError:
            return 0
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._counts:
                return self._counts[key]
        relpath = str(path.relative_to(self.tree.root))
        data = unpack(self.tree, relpath, self.unpack_limit) if self._packed(path) else _read(self.tree, path)
        count = data.count(b"\n")
        if self.settings.format == "text":  # only an entry's first line starts at column 0 with a letter
            count -= data.count(b"\n ") + data.count(b"\n{") + data.count(b"\n}")
        with self._lock:
            self._counts[key] = count
        return count

    # Live tail, search, activity.

    def live_sizes(self, every: dict[str, list[Path]]) -> dict[str, int]:
        """Where each live file of a user ends now: the start of a live tail."""
        # An archive never grows (and one halfway through its switch to .gz holds gzip bytes): not tailed.
        return {str(paths[-1].relative_to(self.root)): _size(paths[-1])
                for paths in every.values() if parse_archive_name(paths[-1].name) is None}

    def after(self, every: dict[str, list[Path]], sizes: dict[str, int] | None) -> tuple[list[Item], dict[str, int]]:
        """Entries appended to a user's live files past `sizes`, oldest first, and where the files end now.

        A file `sizes` does not name is new since (read from its start); a file shorter than it was
        was rotated (its successor read from its start). No `sizes`: where to start a tail.
        """
        items: list[Item] = []
        now = self.live_sizes(every)
        if sizes is None:
            return items, now
        for relpath, size in now.items():
            begin = sizes.get(relpath, max(0, size - TAIL_MAX))
            if begin > size:
                begin = max(0, size - TAIL_MAX)  # rotated since: the new live file from its start
            if size > begin:
                path = self.root / relpath
                text = _File(self.tree, path)[begin:size].decode("utf-8", "replace")
                items.extend(Item(w.stream, w.ts, w.text, relpath, begin)
                             for w in parse(text, relpath, self.settings.format, self.settings.tz))
        items.sort(key=lambda i: i.ts if i.ts is not None else float("inf"))
        return items, now

    def search(self, needle: str, *, user: str | None = None, streams: set[str] | None = None,
               limit: int = 200) -> tuple[list[tuple[str, Item]], bool]:
        """Entries containing `needle` (case-insensitive), newest users first; and whether the search stopped early."""
        wanted = needle.casefold()
        deadline = time.monotonic() + SEARCH_SECONDS
        found: list[tuple[str, Item]] = []
        names = [user] if user is not None else [name for name, _ in self.users()]
        for name in names:
            for stream, paths in self.streams(name).items():
                if streams is not None and stream not in streams:
                    continue
                for path in reversed(paths):
                    data = self._content(path)
                    raw = data if isinstance(data, bytes) else data[0:data.size]
                    if wanted.encode() not in raw.lower() and wanted not in raw.decode("utf-8", "replace").casefold():
                        continue
                    source = str(path.relative_to(self.root))
                    text = raw.decode("utf-8", "replace")
                    for written in parse(text, source, self.settings.format, self.settings.tz):
                        if wanted in written.text.casefold():
                            found.append((name, Item(written.stream, written.ts, written.text, source, 0)))
                            if len(found) >= limit:
                                return found, True
                    if time.monotonic() > deadline:
                        return found, True
        return found, False

    def activity(self, every: dict[str, list[Path]], hours: int,
                 now: float | None = None) -> tuple[float, dict[str, list[int]]]:
        """Entries per hour by stream over the last `hours` (the first hour's start, and a count per hour per stream).

        Counted from the stamps alone, read back from the end of each stream until they are older
        than the first hour: no entry is parsed, so a busy user's chart costs a scan of its last hours.
        """
        now = time.time() if now is None else now
        first = (int(now) // 3600 - hours + 1) * 3600
        oldest = self._hour_key(first)
        out: dict[str, list[int]] = {}
        for stream, paths in every.items():
            seen: Counter[bytes] = Counter()
            for path in reversed(paths):
                data = self._content(path)
                end, done = len(data), False
                while end > 0 and not done:
                    lo = max(0, end - ACTIVITY_CHUNK)
                    chunk = data[lo:end]
                    cut = chunk.find(b"\n") + 1 if lo > 0 else 0  # a line cut by the chunk: read with the next one
                    stamps = self.stamps.findall(chunk, cut)
                    seen.update(stamps)
                    done = bool(stamps) and stamps[0] < oldest
                    end = lo + cut if cut else lo
                if done:
                    break
            for key, n in seen.items():
                if key >= oldest:
                    try:
                        bucket = int(self._hour_start(key) - first) // 3600
                    except ValueError:  # "9999-99-99 99": not a time, not counted
                        continue
                    if 0 <= bucket < hours:
                        out.setdefault(stream, [0] * hours)[bucket] += n
        return float(first), out

    def _hour_key(self, ts: float) -> bytes:
        # In the zone the stamps are written in (None: the machine's local zone).
        when = datetime.fromtimestamp(ts, self.settings.tz) if self.settings.tz else datetime.fromtimestamp(ts)  # noqa: DTZ006
        if self.settings.format == "text":
            return when.strftime("%Y-%m-%d %H").encode()
        return when.astimezone(UTC).strftime("%Y-%m-%dT%H").encode()

    def _hour_start(self, key: bytes) -> float:
        if self.settings.format == "text":
            when = datetime.strptime(key.decode(), "%Y-%m-%d %H")  # noqa: DTZ007 - the zone is the settings'
            return (when.replace(tzinfo=self.settings.tz) if self.settings.tz else when).timestamp()
        return datetime.strptime(key.decode(), "%Y-%m-%dT%H").replace(tzinfo=UTC).timestamp()


class _File:
    """A regular file of the tree read by slices, never whole, and never through a link (or from a FIFO)."""

    def __init__(self, tree: LogTree, path: Path) -> None:
        self.tree = tree
        self.relpath = str(path.relative_to(tree.root))
        try:
            st = path.lstat()
        except OSError:
            st = None
        self.size = st.st_size if st else 0
        self.inode = st.st_ino if st else None

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, part: slice) -> bytes:
        lo, hi = part.start or 0, min(part.stop if part.stop is not None else self.size, self.size)
        if hi <= lo:
            return b""
        try:
            fd = self.tree.open_existing(self.relpath, os.O_RDONLY)
        except OSError:
            return b""
        try:
            # Replaced since it was measured (a plain archive by its gzip bytes, a live file by its successor): gone.
            if os.fstat(fd).st_ino != self.inode:
                return b""
            return os.pread(fd, hi - lo, lo)
        finally:
            os.close(fd)


def _read(tree: LogTree, path: Path) -> bytes:
    file = _File(tree, path)
    return file[0:file.size]


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _scandir(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as found:
            return list(found)
    except OSError:
        return []


def _plain_folder(root: Path, relpath: str) -> bool:
    """Every part of `relpath` below `root` is a folder, and none is a link."""
    path = root
    for part in relpath.split("/"):
        path = path / part
        if not _is_dir(path):
            return False
    return True


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _newest(folder: Path) -> float:
    newest = 0.0
    for entry in _scandir(folder):
        try:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        except OSError:
            continue
    return newest


def _stream_of(filename: str) -> str:
    return filename.split(".", 1)[0].replace("_", " ")


def encode_cursor(position: dict[str, list[object]]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, files: dict[str, list[Path]], root: Path) -> dict[str, tuple[Path, int]]:
    """A page cursor back into positions; anything that does not name one of the user's own files is ignored."""
    if not cursor or len(cursor) > MAX_CURSOR:
        return {}
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return {}
    out: dict[str, tuple[Path, int]] = {}
    if not isinstance(raw, dict):
        return out
    for stream, value in raw.items():
        if (stream in files and isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
                and isinstance(value[1], int) and value[1] >= 0):
            by_name = {str(p.relative_to(root)): p for p in files[stream]}
            if value[0] in by_name:
                out[stream] = (by_name[value[0]], value[1])
    return out
