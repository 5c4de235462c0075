"""`apilog verify`: check the seal log's chain and tags, then every live file and archive against it (docs/sealing.md).

The seal log says what each file must hold: the byte ranges each batch appended, with their
digests, the files rotated into archive/, the digest of each archive's .gz and the archives
retention removed. A verify reads the seal log, then each file once, front to back, through the
tree's own opener (no link is ever followed, no FIFO waited on). Against a running apilogd a live
file may be a batch ahead of the seal log read first, or rotated since: such a file is read again,
then the seal log, and passes when it is exactly what its seals held at some moment since.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from apilog.core import seal
from apilog.core.logfile import ARCHIVE, SYSTEM, USERS, parse_archive_name, user_dir
from apilog.core.tree import LogTree, is_gzip

RETRIES = 8  # rounds of a failing file read again, then checked against the seal log read anew
RETRY_WAIT = 0.25
CHUNK = 1 << 20
MAX_SEGMENT = 1 << 30  # a seal log file larger than this was not written by apilogd (which starts anew at 64 MiB)
LEDGER = "ledger.json"  # the daemon's state: where the chain stood at its last checkpoint
SEAL_KEY = "seal.key"  # and the chain's current key, whose id ties the two


@dataclass
class Expected:
    """What one file must hold, by the seal log; `lines` says which seal line sealed each range."""

    ranges: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, length, digest)
    lines: list[int] = field(default_factory=list)
    gz: tuple[int, str] | None = None  # an archive's .gz: (size, digest)

    def sealed_by(self, line: int) -> int:
        """How many bytes were sealed as of seal line `line`."""
        return sum(length for (_, length, _), n in zip(self.ranges, self.lines, strict=True) if n <= line)


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
    rotated: dict[str, list[tuple[Expected, int]]] = field(default_factory=dict)  # live path -> (its past, rotated at line)
    problems: list[Problem] = field(default_factory=list)
    lines: int = 0
    id: str = ""  # the key id its first line names
    last_digest: str = ""
    last_time: float | None = None


def _segments(tree: LogTree) -> Iterator[tuple[str, Iterator[bytes]]]:
    """Each seal log file, in order, as its lines; raises OSError for one that is not a plain file apilogd wrote."""
    for name in seal.segments(tree.root):
        relpath = f"{seal.SEALS}/{name}"
        handle = tree.reader(relpath)  # never through a link, never a FIFO or a folder
        if os.fstat(handle.fileno()).st_size > MAX_SEGMENT:
            handle.close()
            raise OSError(f"{relpath} is larger than apilogd ever writes one")
        yield relpath, _lines_of(handle)


def _lines_of(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        yield from handle


def read_seals(tree: LogTree, key: seal.VerificationKey | None, now: float | None = None) -> Seals:
    """Read and check the whole seal log; with `key`, every line's tag against its epoch's key."""
    found = Seals()
    prev: seal.Body | None = None
    epoch_key: tuple[int, bytes] | None = (0, key.key) if key else None
    # No line may claim an epoch after the clock's: deriving its key would run for ever.
    last_epoch = seal.epoch_at(time.time() if now is None else now, key.t0, key.epoch_seconds) + 1 if key else None
    try:
        for where, lines in _segments(tree):
            for number, raw_line in enumerate(lines, 1):
                checked = _chain_problem(raw_line, prev, found.last_digest, key, epoch_key, last_epoch)
                if isinstance(checked, str):
                    found.problems.append(Problem(where, f"line {number}: {checked}"))
                    return found  # nothing after a broken link can be trusted
                body, epoch_key = checked
                outside = next((p for p in _paths(body) if not _in_tree(p)), None)
                if outside is not None:
                    found.problems.append(Problem(where, f"line {number}: names {outside[:120]!r}, outside the log tree"))
                    return found
                _apply(found, body)
                found.id = found.id or body.id
                if body.note:
                    found.problems.append(Problem(where, f"line {number}: apilogd sealed that {body.note}"))
                prev, found.last_digest = body, seal.digest(raw_line)
                found.lines += 1
                found.last_time = body.t
    except FileNotFoundError:
        pass  # no seal log at all: every file will say it was never sealed
    except (OSError, UnicodeDecodeError) as exc:
        found.problems.append(Problem(seal.SEALS, f"cannot be read: {exc}"))
    return found


def _chain_problem(raw_line: bytes, prev: seal.Body | None, prev_digest: str, key: seal.VerificationKey | None,
                   epoch_key: tuple[int, bytes] | None,
                   last_epoch: int | None) -> str | tuple[seal.Body, tuple[int, bytes] | None]:
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
        if not body.id or body.e != 0:
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
    if last_epoch is not None and (body.e > last_epoch or (body.end is not None and body.end > last_epoch)):
        return f"claims epoch {max(body.e, body.end or 0)}, after the clock's"
    if key is not None and epoch_key is not None:
        at, current = epoch_key
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


def _apply(found: Seals, body: seal.Body) -> None:
    """What one seal line changes in what each file must hold."""
    files = found.files
    for relpath, before, length, digest in body.w:
        expected = files.setdefault(relpath, Expected())
        expected.ranges.append((before, length, digest))
        expected.lines.append(body.n)
    for relpath, archive in body.mv:
        moved = files.pop(relpath, Expected())
        files[archive] = moved
        found.rotated.setdefault(relpath, []).append((moved, body.n))
    for archive, size, digest in body.gz:
        files.setdefault(archive, Expected()).gz = (size, digest)
    for archive in body.rm:
        files.pop(archive.removesuffix(".gz"), None)


def _on_disk(tree: LogTree, tops: list[str]) -> tuple[set[str], list[Problem]]:
    """Every file below the given folders (compressions under way left out), and every link found there."""
    out: set[str] = set()
    links: list[Problem] = []
    root = tree.root
    for top in tops:
        if os.path.islink(root / top):
            links.append(Problem(top, "is a link: apilogd never makes one, and verify never follows one"))
            continue
        for dirpath, dirs, names in os.walk(root / top):
            for name in dirs + names:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    links.append(Problem(os.path.relpath(path, root), "is a link: apilogd never makes one, "
                                                                        "and verify never follows one"))
            out.update(os.path.relpath(os.path.join(dirpath, n), root) for n in names
                       if not n.endswith(".gz.tmp") and not os.path.islink(os.path.join(dirpath, n)))
    return out, links


def _tops(user: str | None) -> list[str]:
    if user is None:
        return [SYSTEM, USERS, ARCHIVE]
    folder = user_dir(user)
    return [folder, f"{ARCHIVE}/{folder}"]


def _within(relpath: str, tops: list[str]) -> bool:
    return any(relpath == top or relpath.startswith(top + "/") for top in tops)


def _first_line(data: bytes) -> str:
    text = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    return text if len(text) <= 120 else text[:117] + "..."


def _read_range(handle: BinaryIO, length: int) -> tuple[str, int, bytes, int]:
    """Digest of the next `length` bytes (read in chunks), how many there were, the first chunk, and their newlines."""
    hashed = seal.new_digest()
    got, first, newlines = 0, b"", 0
    while got < length:
        chunk = handle.read(min(CHUNK, length - got))
        if not chunk:
            break
        if not got:
            first = chunk
        hashed.update(chunk)
        got += len(chunk)
        newlines += chunk.count(b"\n")
    return hashed.hexdigest(), got, first, newlines


def check_content(handle: BinaryIO, ranges: list[tuple[int, int, str]], shown: str) -> Problem | None:
    """Read a file's content front to back against its sealed ranges: the first place it differs."""
    at, line = 0, 1
    for offset, length, digest in ranges:
        if offset != at:
            return Problem(shown, f"its sealed bytes go on at byte {offset}, but the ones before end at byte {at}",
                           f"line {line}")
        found, got, first, newlines = _read_range(handle, length)
        if got < length:
            return Problem(shown, f"cut: it ends at byte {at + got}, sealed up to byte {ranges[-1][0] + ranges[-1][1]}",
                           f"line {line}: {_first_line(first)!r}" if got else f"line {line} and after are gone")
        if found != digest:
            # One seal covers what a batch appended to the file: most often one entry, under load a few.
            last = line + max(0, newlines - 1)
            span = f"line {line}" if last == line else f"lines {line}-{last}, sealed together"
            return Problem(shown, f"{span} (bytes {at}-{at + length}) differ from what was sealed "
                                  "(changed, added, removed or moved)", f"line {line}: {_first_line(first)!r}")
        at += length
        line += newlines
    extra = handle.read(CHUNK)
    if extra:
        return Problem(shown, f"holds bytes after the last sealed one (byte {at}): added outside apilogd",
                       f"line {line}: {_first_line(extra)!r}")
    return None


def _exists(tree: LogTree, relpath: str) -> bool:
    try:
        return tree.exists(relpath)
    except OSError:
        return True  # something stands there that is not a plain folder: opening it says what


def check_file(tree: LogTree, relpath: str, expected: Expected | None) -> Problem | None:
    """One file (a plain path: an archive is found as itself and as its .gz) against what it must hold."""
    packed = relpath + ".gz"
    if expected is None:
        return Problem(relpath, "was never sealed by apilogd: made or put here outside it")
    try:
        has_plain, has_packed = _exists(tree, relpath), _exists(tree, packed)
        if not has_plain and not has_packed:
            return Problem(relpath, "removed: the seal log says it exists" + (" (as .gz)" if expected.gz else ""))
        if has_plain:
            with tree.reader(relpath) as handle:
                # Halfway through its switch to .gz, an archive holds the .gz's bytes under its plain name.
                problem = (_check_packed(tree, relpath, expected) if relpath.startswith(f"{ARCHIVE}/") and is_gzip(handle)
                           else check_content(handle, expected.ranges, relpath))
            if problem is not None or not has_packed:
                return problem
        return _check_packed(tree, packed, expected)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        return Problem(relpath, f"cannot be read whole: {exc}")


def _check_packed(tree: LogTree, packed: str, expected: Expected) -> Problem | None:
    """An archive's gzip: the one sealed, byte for byte; else (a compression not sealed yet) the plain copy's content."""
    if expected.gz is not None:
        size, digest = expected.gz
        with tree.reader(packed) as handle:
            found = seal.file_digest(handle)
            found_size = os.fstat(handle.fileno()).st_size
        if found == digest and found_size == size:
            return None
        with tree.reader(packed, unpacked=True) as handle:
            inner = check_content(handle, expected.ranges, packed) if expected.ranges else None
        return inner or Problem(packed, "rewritten: its bytes are not the .gz that was sealed "
                                        "(recompressed, or another archive's)")
    with tree.reader(packed, unpacked=True) as handle:
        return check_content(handle, expected.ranges, packed)


def _snapshot(tree: LogTree, relpath: str) -> bytes | None:
    try:
        with tree.reader(relpath) as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError:
        return b"\0unreadable"  # matches no seal


def _matches_since(data: bytes | None, seals: Seals, relpath: str, since_line: int) -> bool:
    """A live file read after seal line `since_line`: does it hold exactly what its seals said at some moment since?

    That is: a prefix, ending on a seal's boundary, of the file's current seals or of a past of it
    rotated after `since_line`, no shorter than what was sealed for it by `since_line`.
    """
    current = seals.files.get(relpath)
    pasts = [past for past, at in seals.rotated.get(relpath, []) if at > since_line]
    for candidate in ([current] if current else []) + pasts:
        if data is None:
            if candidate is current and candidate.sealed_by(since_line) == 0:
                return True  # rotated before it was read; its successor was sealed only after
            continue
        at = 0
        for offset, length, digest in candidate.ranges:
            if at == len(data) or offset != at or at + length > len(data):
                break
            if seal.digest(data[at:at + length]) != digest:
                break
            at += length
        if at == len(data) and at >= candidate.sealed_by(since_line):
            return True
    return data is None and current is None  # rotated, and nothing written to it since


def ledger_position(state_dir: Path | None) -> tuple[str, int] | None:
    """(key id, line) of the chain as apilogd's ledger saw it at its last checkpoint; None where it cannot be read.

    Read before the seal log (a checkpoint saves only lines already in it), and only where apilogd's
    state is readable: its user, or root.
    """
    if state_dir is None:
        return None
    try:
        chain = json.loads((state_dir / SEAL_KEY).read_bytes()).get("id")
        saved = json.loads((state_dir / LEDGER).read_bytes()).get("seal")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(chain, str) or not isinstance(saved, list) or len(saved) != 2 or not isinstance(saved[0], int):
        return None
    return chain, saved[0]


@dataclass
class Report:
    problems: list[Problem]
    files: int  # files and archives checked
    lines: int  # seal lines read
    last_time: float | None


class Verification:
    """One verify: the seal log read and the files to check listed (for a progress bar), then `run`."""

    def __init__(self, root: Path, key: seal.VerificationKey | None, user: str | None = None,
                 state_dir: Path | None = None) -> None:
        self.tree = LogTree(root)
        self.key, self.tops = key, _tops(user)
        self.ledger = ledger_position(state_dir)
        self.seals = read_seals(self.tree, key)
        on_disk, self.links = _on_disk(self.tree, self.tops)
        paths = {p for p in self.seals.files if _within(p, self.tops)}
        for relpath in on_disk:
            match = parse_archive_name(relpath.rpartition("/")[2])
            paths.add(relpath.removesuffix(".gz") if match and match["gz"] else relpath)
        self.paths = sorted(paths)
        self.sizes = {p: self._size(p) for p in self.paths}  # for the progress bar
        self.total_bytes = sum(self.sizes.values())

    def _size(self, relpath: str) -> int:
        for candidate in (relpath, relpath + ".gz"):
            try:
                return (self.tree.root / candidate).lstat().st_size
            except OSError:
                continue
        return 0

    def run(self, progress: Callable[[int], None] = lambda n: None) -> Report:
        """Check every file; one that fails is read again, and checked against the seal log read after it."""
        seals = self.seals
        failed = {}
        for relpath in self.paths:
            problem = check_file(self.tree, relpath, seals.files.get(relpath))
            if problem is not None:
                failed[relpath] = problem
            progress(self.sizes[relpath])
        live = [p for p in failed if not p.startswith(ARCHIVE + "/")]
        for _ in range(RETRIES if failed and not seals.problems else 0):
            time.sleep(RETRY_WAIT)
            since = seals.lines
            snapshots = {p: _snapshot(self.tree, p) for p in live if p in failed}
            seals = read_seals(self.tree, self.key)  # after the files: it covers what they hold
            if seals.problems:
                break
            for relpath in list(failed):
                if relpath in snapshots:
                    if _matches_since(snapshots[relpath], seals, relpath, since):
                        del failed[relpath]
                elif check_file(self.tree, relpath, seals.files.get(relpath)) is None:
                    del failed[relpath]
            if not failed:
                break
        problems = [*seals.problems, *self.links, *failed.values()]
        if self.key is not None and seals.lines == 0:
            problems.append(Problem(seal.SEALS, f"missing: the tree was sealed with key {self.key.id}, and nothing "
                                                "of its seal log is left"))
        chain = seals.id or (self.key.id if self.key else "")
        if self.ledger is not None and self.ledger[0] == chain and seals.lines < self.ledger[1]:
            problems.append(Problem(seal.SEALS, f"ends at line {seals.lines}, but apilogd sealed up to line "
                                                f"{self.ledger[1]} (its last lines were cut)"))
        return Report(problems, len(self.paths), seals.lines, seals.last_time)
