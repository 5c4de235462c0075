"""`apilog verify`: check the seal log's chain and tags, then every live file and archive against it (SPEC 13).

The seal log says what each file must hold: the byte ranges each batch appended, with their
digests, the files rotated into archive/, the digest of each archive's .gz and the archives
retention removed. A verify reads the seal log, then each file once, front to back. Against a
running apilogd a file may be a batch ahead of the seal log it read, or rotated since: such a
file is checked again against the seal log read anew, a few times, before it is called tampered.
"""

from __future__ import annotations

import errno
import gzip
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from apilog.core import seal
from apilog.core.logfile import ARCHIVE, SYSTEM, USERS, parse_archive_name, user_dir

RETRIES = 5  # rounds of a file checked again against a seal log read anew (a running apilogd)
RETRY_WAIT = 0.4
CHUNK = 1 << 20


@dataclass
class Expected:
    """What one file must hold, by the seal log."""

    ranges: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, length, digest)
    gz: tuple[int, str] | None = None  # an archive's .gz: (size, digest)


@dataclass
class Problem:
    file: str
    what: str
    entry: str = ""  # the first bad entry, where one can be named

    def __str__(self) -> str:
        return f"{self.file}: {self.what}" + (f"; first bad entry: {self.entry}" if self.entry else "")


@dataclass
class Seals:
    """The seal log read once: what every file must hold, and what is wrong with the log itself."""

    files: dict[str, Expected] = field(default_factory=dict)  # plain path (an archive without .gz) -> expected
    problems: list[Problem] = field(default_factory=list)
    lines: int = 0
    last_time: float | None = None
    signature: tuple[tuple[str, int], ...] = ()  # the seal log files and sizes read: a change means read again


def read_seals(root: Path, key: seal.VerificationKey | None) -> Seals:
    """Read and check the whole seal log; with `key`, every line's tag against its epoch's key."""
    found = Seals()
    folder = root / seal.SEALS
    try:
        names = sorted(n for n in os.listdir(folder) if seal.is_segment(n))
    except FileNotFoundError:
        names = []
    found.signature = tuple((n, (folder / n).stat().st_size) for n in names)
    prev: seal.Body | None = None
    prev_digest = ""
    epoch_key: tuple[int, bytes] | None = (0, key.key) if key else None
    for name in names:
        where = f"{seal.SEALS}/{name}"
        for number, raw_line in enumerate((folder / name).read_bytes().splitlines(keepends=True), 1):
            problem = _chain_problem(raw_line, prev, prev_digest, key, epoch_key)
            if isinstance(problem, str):
                found.problems.append(Problem(where, f"line {number}: {problem}"))
                return found  # nothing after a broken link can be trusted
            body, epoch_key = problem
            outside = next((p for p in _paths(body) if not _in_tree(p)), None)
            if outside is not None:
                found.problems.append(Problem(where, f"line {number}: names {outside[:120]!r}, outside the log tree"))
                return found
            _apply(found.files, body)
            if body.note:
                found.problems.append(Problem(where, f"line {number}: apilogd sealed that {body.note}"))
            prev, prev_digest = body, seal.digest(raw_line)
            found.lines += 1
            found.last_time = body.t
    return found


def _chain_problem(raw_line: bytes, prev: seal.Body | None, prev_digest: str, key: seal.VerificationKey | None,
                   epoch_key: tuple[int, bytes] | None) -> str | tuple[seal.Body, tuple[int, bytes] | None]:
    """What is wrong with a line where it stands in the chain, or (its body, its epoch's key)."""
    try:
        body, raw, tag = seal.split(raw_line)
    except ValueError as exc:
        return str(exc)
    if not raw_line.endswith(b"\n"):
        return "cut (no end of line)"
    expected = 1 if prev is None else prev.n + 1
    if body.n != expected:
        return f"is seal line {body.n} where line {expected} belongs (lines removed or moved)"
    if prev is None:
        if not body.id:
            return "the seal log does not begin with its first line (cut at the front)"
        if key is not None and body.id != key.id:
            return f"sealed with another key (id {body.id}; the key given is {key.id})"
    elif body.id:
        return f"a new seal key (id {body.id}) begins here: the old one was lost or replaced"
    elif body.p != prev_digest:
        return f"does not follow seal line {prev.n} (a line was changed or removed)"
    elif prev.end is not None and body.e != prev.end:
        return f"claims epoch {body.e}, though the line before ended epoch {prev.e} for epoch {prev.end}"
    elif prev.end is None and body.e != prev.e:
        return f"moves from epoch {prev.e} to {body.e} without epoch {prev.e}'s last line (lines were cut)"
    if key is not None and epoch_key is not None:
        at, current = epoch_key
        if body.e < at:
            return f"claims epoch {body.e}, after epoch {at}"
        current = seal.evolve(current, body.e - at)
        if not seal.tag_holds(raw, tag, current):
            return f"its seal does not hold under epoch {body.e}'s key (forged or changed)"
        epoch_key = (body.e, current)
    return body, epoch_key


def _paths(body: seal.Body) -> list[str]:
    return [w[0] for w in body.w] + [p for pair in body.mv for p in pair] + [g[0] for g in body.gz] + body.rm


def _in_tree(relpath: str) -> bool:
    """A path apilogd seals: below system/, users/ or archive/, with no way out (a forged line is never followed)."""
    parts = relpath.split("/")
    return (len(parts) >= 2 and parts[0] in (SYSTEM, USERS, ARCHIVE)
            and all(p not in ("", ".", "..") and "\0" not in p for p in parts))


def _apply(files: dict[str, Expected], body: seal.Body) -> None:
    """What one seal line changes in what each file must hold."""
    for relpath, before, length, digest in body.w:
        files.setdefault(relpath, Expected()).ranges.append((before, length, digest))
    for relpath, archive in body.mv:
        files[archive] = files.pop(relpath, Expected())
    for archive, size, digest in body.gz:
        files.setdefault(archive, Expected()).gz = (size, digest)
    for archive in body.rm:
        files.pop(archive.removesuffix(".gz"), None)


def _on_disk(root: Path, tops: list[str]) -> set[str]:
    """Every file below the given folders of the tree (compressions under way left out)."""
    out: set[str] = set()
    for top in tops:
        for dirpath, _dirs, names in os.walk(root / top):
            out.update(os.path.relpath(os.path.join(dirpath, n), root) for n in names if not n.endswith(".tmp"))
    return out


def _tops(user: str | None) -> list[str]:
    if user is None:
        return [SYSTEM, USERS, ARCHIVE]
    folder = user_dir(user)
    return [folder, f"{ARCHIVE}/{folder}"]


def _within(relpath: str, tops: list[str]) -> bool:
    return any(relpath == top or relpath.startswith(top + "/") for top in tops)


def _open(path: Path, unpacked: bool) -> BinaryIO:
    """A regular file, never through a link, never waiting on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    handle: BinaryIO = os.fdopen(fd, "rb")
    return gzip.GzipFile(fileobj=handle, mode="rb") if unpacked else handle  # type: ignore[return-value]


def _first_line(data: bytes) -> str:
    text = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    return text if len(text) <= 120 else text[:117] + "..."


def check_content(handle: BinaryIO, ranges: list[tuple[int, int, str]], shown: str) -> Problem | None:
    """Read a file's content front to back against its sealed ranges: the first place it differs."""
    at, line = 0, 1
    for offset, length, digest in ranges:
        if offset != at:
            return Problem(shown, f"its sealed bytes go on at byte {offset}, but the ones before end at byte {at}",
                           f"line {line}")
        data = handle.read(length)
        if len(data) < length:
            return Problem(shown, f"cut: it ends at byte {at + len(data)}, sealed up to byte {ranges[-1][0] + ranges[-1][1]}",
                           f"line {line}: {_first_line(data)!r}" if data else f"line {line} and after are gone")
        if seal.digest(data) != digest:
            # One seal covers what a batch appended to the file: most often one entry, under load a few.
            last = line + max(0, data.count(b"\n") - 1)
            span = f"line {line}" if last == line else f"lines {line}-{last}, sealed together"
            return Problem(shown, f"{span} (bytes {at}-{at + length}) differ from what was sealed "
                                  "(changed, added, removed or moved)", f"line {line}: {_first_line(data)!r}")
        at += length
        line += data.count(b"\n")
    extra = handle.read(CHUNK)
    if extra:
        return Problem(shown, f"holds bytes after the last sealed one (byte {at}): added outside apilogd",
                       f"line {line}: {_first_line(extra)!r}")
    return None


def check_file(root: Path, relpath: str, expected: Expected | None) -> Problem | None:
    """One file (a plain path: an archive is found as itself or its .gz) against what it must hold."""
    plain, packed = root / relpath, root / (relpath + ".gz")
    if expected is None:
        return Problem(relpath, "was never sealed by apilogd: made or put here outside it")
    try:
        if plain.exists() or plain.is_symlink():
            with _open(plain, False) as handle:
                return check_content(handle, expected.ranges, relpath)
        if not packed.exists():
            return Problem(relpath, "removed: the seal log says it exists" + (" (as .gz)" if expected.gz else ""))
        shown = relpath + ".gz"
        if expected.gz is not None:
            size, digest = expected.gz
            with _open(packed, False) as handle:
                found = seal.file_digest(handle)
            if found != digest or packed.stat().st_size != size:
                with _open(packed, True) as handle:
                    inner = check_content(handle, expected.ranges, shown) if expected.ranges else None
                return inner or Problem(shown, "rewritten: its bytes are not the .gz that was sealed "
                                               "(recompressed, or another archive's)")
        if not expected.ranges:
            return None
        with _open(packed, True) as handle:
            return check_content(handle, expected.ranges, shown)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        return Problem(relpath, f"cannot be read whole: {exc}")


@dataclass
class Report:
    problems: list[Problem]
    files: int  # files and archives checked
    lines: int  # seal lines read
    last_time: float | None


def _wanted(seals: Seals, root: Path, tops: list[str]) -> tuple[list[str], int]:
    """The plain paths to check (sealed ones, and files on disk the seal log does not know), and their bytes."""
    paths = {p for p in seals.files if _within(p, tops)}
    for relpath in _on_disk(root, tops):
        name = relpath.rpartition("/")[2]
        match = parse_archive_name(name)
        paths.add(relpath.removesuffix(".gz") if match and match["gz"] else relpath)
    total = 0
    for relpath in paths:
        for candidate in (root / relpath, root / (relpath + ".gz")):
            try:
                total += candidate.lstat().st_size
            except OSError:
                continue
    return sorted(paths), total


class Verification:
    """One verify: the seal log read and the files to check listed (for a progress bar), then `run`."""

    def __init__(self, root: Path, key: seal.VerificationKey | None, user: str | None = None) -> None:
        self.root, self.key, self.tops = root, key, _tops(user)
        self.seals = read_seals(root, key)
        self.paths, self.total_bytes = _wanted(self.seals, root, self.tops)

    def run(self, progress: Callable[[int], None] = lambda n: None) -> Report:
        """Check every file; one that fails is checked again while a running apilogd moves the seal log on."""
        root, seals = self.root, self.seals
        failed = {}
        for relpath in self.paths:
            problem = check_file(root, relpath, seals.files.get(relpath))
            if problem is not None:
                failed[relpath] = problem
            progress(_size(root, relpath))
        for _ in range(RETRIES):
            if not failed or seals.problems:
                break
            time.sleep(RETRY_WAIT)
            again = read_seals(root, self.key)
            if again.signature == seals.signature:
                break  # the seal log did not move: what failed is not a batch in flight
            seals = again
            failed = {p: problem for p in failed if (problem := check_file(root, p, seals.files.get(p))) is not None}
        return Report([*seals.problems, *failed.values()], len(self.paths), seals.lines, seals.last_time)


def _size(root: Path, relpath: str) -> int:
    for candidate in (root / relpath, root / (relpath + ".gz")):
        try:
            return candidate.lstat().st_size
        except OSError:
            continue
    return 0
