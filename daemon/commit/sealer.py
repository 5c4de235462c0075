"""Sealing as apilogd writes (docs/sealing.md): the current epoch's key in the state folder, and one seal line per batch.

The seal line of a batch is one more share of the batch's journal record (the last), so a
batch a crash undoes is redone with the very line it was committed with, and sealing stays
exactly-once with the files. The key is evolved only after the epoch's last line is committed;
the key file is readable by apilogd's user alone, and the verification key waits in
`state/seal.verify` until `apilogd seal-key` prints and removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from apilog.core import seal
from apilog.core.folder import Folder
from apilog.core.logfile import ARCHIVE, SYSTEM, USERS, parse_archive_name
from apilog.core.tree import LogTree, is_gzip

from ..state.ledger import DAMAGED
from .open_files import DISK_ERRORS, OpenFiles

KEY_NAME = "seal.key"
VERIFY_NAME = "seal.verify"
KEY_MODE = 0o600  # never the app's group
SEGMENT_BYTES = 64 * 1024 * 1024  # a new seal log file past this
TAIL_BYTES = 16 * 1024 * 1024  # read of the last seal log file at start: far more than its last line


class Sealer:
    """The chain's position (line number, digest of the last line) and the current epoch's key."""

    def __init__(self, state: Folder, tree: LogTree, files: OpenFiles, epoch_seconds: int, *,
                 durable: bool, saved: tuple[int, str] | None) -> None:
        """`saved`: the line number and digest the ledger holds as of its last checkpoint."""
        self.state = state
        self.tree = tree
        self.files = files
        self.durable = durable
        self.n, self.prev, self.segment = 0, "", ""
        self.next_epoch: int | None = None  # the last line ended its epoch: evolve before the next one
        self.notes: list[str] = []  # what the next line must say (a seal log cut outside apilogd)
        self.reports: list[str] = []  # the same, for INTERNAL (taken by the writer)
        self.genesis: seal.Body | None = None
        self.key = b""  # none yet: made by _start_chain
        damage = self._load_key()
        self._read_tail()
        if saved is not None and saved[0] > self.n:
            self.note(f"the seal log ended at line {self.n}; apilogd had sealed up to line {saved[0]}")
            self.n, self.prev = saved
        self._before = (self.n, self.prev, self.segment, 0)  # where the chain stood before the line committed last
        if not self.key:
            self._start_chain(epoch_seconds)
            self.next_epoch = None  # the old chain's: the new key starts at its epoch 0
            if damage or self.n:
                self.note(f"{damage or 'the seal key was missing'}; a new key (id {self.id}) seals from here on")
        elif self.n == 0 and not self.notes:
            # No line anywhere: a first start saves its key before its first line is committed, and crashed between.
            self._begin()
        if self.next_epoch is not None and self.next_epoch > seal.epoch_at(time.time(), self.t0, self.epoch_seconds) + 1:
            self.note(f"the last seal line names epoch {self.next_epoch}, after the clock's; not believed")
            self.next_epoch = None
        if self.next_epoch is not None and self.next_epoch > self.epoch:
            self.evolve(self.next_epoch)  # a crash came between an epoch's last line and the new key

    def _load_key(self) -> str:
        """Read the current key; what was wrong with it ("" when it is fine or was never made)."""
        try:
            key = json.loads(self.state.read(KEY_NAME, 4096))
            self.id, self.t0, self.epoch_seconds = str(key["id"]), float(key["t0"]), int(key["len"])
            self.epoch, self.key = int(key["epoch"]), bytes.fromhex(key["key"])
            if len(self.key) != 32 or self.epoch < 0 or self.epoch_seconds < 1:
                raise ValueError("not a seal key")
        except FileNotFoundError:
            return ""
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Damaged, or not a plain file: logging goes on under a new key, and the break is sealed and reported.
            self.key = b""
            aside = self.state.set_aside(KEY_NAME, DAMAGED)
            return f"{self.state.path / KEY_NAME} was damaged ({type(exc).__name__}: {str(exc)[:100]}); set aside as {aside}"
        return ""

    # The chain's start and its key.

    def _start_chain(self, epoch_seconds: int) -> None:
        """A first key (or a new one, when the old was lost): its first line adopts every file already there."""
        first = os.urandom(32)
        self.t0, self.epoch_seconds, self.epoch, self.key = time.time(), epoch_seconds, 0, first
        self.id = seal.key_id(first)
        verification = seal.VerificationKey(self.id, first, self.t0, epoch_seconds)
        self.state.write_atomic(VERIFY_NAME, verification.text().encode() + b"\n", mode=KEY_MODE, durable=self.durable)
        self._save_key()
        self._begin()

    def _begin(self) -> None:
        """The chain's first line, to be committed next: it names the key and adopts every file already there."""
        whole, packed = self._adopted()
        self.genesis = seal.Body(n=0, e=self.epoch, t=self.t0, w=whole, gz=packed, id=self.id, t0=self.t0,
                                 len=self.epoch_seconds)

    def _adopted(self) -> tuple[list[tuple[str, int, int, str]], list[tuple[str, int, str]]]:
        """Every file written before sealing began, sealed whole as it is now: (live files and plain archives, .gz archives)."""
        root = self.tree.root
        whole: list[tuple[str, int, int, str]] = []
        packed: list[tuple[str, int, str]] = []
        for top in (SYSTEM, USERS, ARCHIVE):
            for dirpath, _dirs, names in os.walk(root / top):
                for name in sorted(names):
                    relpath = os.path.relpath(os.path.join(dirpath, name), root)
                    match = parse_archive_name(name)
                    if top == ARCHIVE and (match is None or match["tmp"]):
                        continue
                    try:
                        with self.tree.reader(relpath) as handle:
                            # An archive's gzip, under its plain name too when a crash came halfway through its switch.
                            gz = match is not None and (bool(match["gz"]) or is_gzip(handle))
                            size, digest = os.fstat(handle.fileno()).st_size, seal.file_digest(handle)
                    except OSError:
                        continue
                    if gz:
                        packed.append((relpath.removesuffix(".gz"), size, digest))
                    else:
                        whole.append((relpath, 0, size, digest))
        return whole, packed

    def _save_key(self) -> None:
        key = {"id": self.id, "t0": self.t0, "len": self.epoch_seconds, "epoch": self.epoch, "key": self.key.hex()}
        self.state.write_atomic(KEY_NAME, json.dumps(key).encode(), mode=KEY_MODE, durable=self.durable)

    def evolve(self, epoch: int) -> None:
        """Move to `epoch`'s key; the old one is gone from disk once this returns."""
        key = seal.evolve(self.key, epoch - self.epoch)
        previous = (self.epoch, self.key)
        self.epoch, self.key = epoch, key
        try:
            self._save_key()
        except BaseException:
            self.epoch, self.key = previous
            raise
        self.next_epoch = None

    def epoch_over(self) -> int | None:
        """The epoch the clock is in, when it is past the current key's (its last line is due)."""
        now = seal.epoch_at(time.time(), self.t0, self.epoch_seconds)
        return now if now > self.epoch and self.next_epoch is None else None

    # Lines.

    def _read_tail(self) -> None:
        """Where the chain stands, from the last line of the last seal log file (after the journal's redo)."""
        try:
            names = seal.segments(self.tree.root)
        except FileNotFoundError:
            return
        if not names:
            return
        self.segment = f"{seal.SEALS}/{names[-1]}"
        try:
            with self.tree.reader(self.segment) as handle:
                handle.seek(max(0, os.fstat(handle.fileno()).st_size - TAIL_BYTES))
                data = handle.read(TAIL_BYTES)
        except OSError:
            return
        last = data.rstrip(b"\n").rpartition(b"\n")[2]
        if not last:
            return
        try:
            body, raw, tag = seal.split(last)
        except ValueError:
            self.note(f"the last line of {self.segment} is not a seal line")
            return
        if self.key and not self._ours(body, raw, tag):
            self.note(f"the last line of {self.segment} is not one apilogd wrote")
            return
        self.n, self.prev = body.n, seal.digest(last + b"\n")
        self.next_epoch = body.end

    def _ours(self, body: seal.Body, raw: bytes, tag: str) -> bool:
        """Sealed with the current key (the key file's epoch is the line's, or the one its `end` moved to)."""
        if body.e == self.epoch:
            return seal.tag_holds(raw, tag, self.key)
        return body.end == self.epoch and body.e < self.epoch  # sealed by a key that is gone: believed only this far

    def make(self, shares: Sequence[tuple[str, int, bytes]], *, mv: Sequence[tuple[str, str]] = (),
             gz: Sequence[tuple[str, int, str]] = (), rm: Sequence[str] = (),
             end: int | None = None) -> tuple[str, int, bytes]:
        """The seal line of a batch (not yet committed): its file, the file's size, its bytes."""
        if self.next_epoch is not None:
            self.evolve(self.next_epoch)
        base = self.genesis or seal.Body(n=0, e=self.epoch, t=time.time())
        written = [(relpath, before, len(data), seal.digest(data)) for relpath, before, data in shares]
        segment, size = self._segment(self.n + 1)
        body = msgspec.structs.replace(base, n=self.n + 1, p=self.prev, e=self.epoch, w=[*base.w, *written],
                                       mv=list(mv), gz=[*base.gz, *gz], rm=list(rm), end=end,
                                       note="; ".join(self.notes))
        return segment, size, seal.line(body, self.key)

    def _segment(self, n: int) -> tuple[str, int]:
        """The seal log file the line numbered `n` goes to, and its size now.

        A new file past SEGMENT_BYTES. One swapped for a link or a folder outside apilogd: the chain
        goes on in a new file; the folder itself swapped: it is set aside and made anew. Either way
        the next line says so, verify finds the break, and writing never stops for it (docs/reference.md, D7).
        """
        try:
            if self.segment and (size := self.files.size(self.segment)) < SEGMENT_BYTES:
                return self.segment, size
        except OSError as exc:
            if exc.errno in DISK_ERRORS:
                raise
            self._note_once(f"{self.segment} could not be opened ({exc.strerror or exc}); the seal log goes on in a new file")
        segment = f"{seal.SEALS}/{seal.segment_name(n)}"
        try:
            return segment, self.files.size(segment)
        except OSError as exc:
            if exc.errno in DISK_ERRORS:
                raise
            aside = f"{seal.SEALS}.aside-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
            self.tree.rename(seal.SEALS, aside)
            self._note_once(f"{seal.SEALS}/ was not a folder apilogd could write ({exc.strerror or exc}); "
                            f"set aside as {aside}")
            return segment, self.files.size(segment)

    def _note_once(self, note: str) -> None:
        if note not in self.notes:
            self.note(note)

    def note(self, note: str) -> None:
        """Something the next seal line says, and INTERNAL reports."""
        self.notes.append(note)
        self.reports.append(note)

    def committed(self, line: tuple[str, int, bytes], end: int | None) -> None:
        """The line `make` gave is in the journal: the chain moves on (and, after an epoch's last line, the key)."""
        segment, size, raw = line
        self._before = (self.n, self.prev, self.segment, size)
        self.n += 1
        self.prev = seal.digest(raw)
        self.segment = segment
        self.genesis = None
        self.notes.clear()
        if end is not None:
            self.next_epoch = end
            with contextlib.suppress(OSError):  # else at the next line, which waits until it can
                self.evolve(end)

    def take_back(self) -> None:
        """The line committed last is taken back with its record (its rotation failed): cut it off the seal log."""
        self.n, self.prev, segment, size = self._before
        self.files.truncate(self.segment, size)
        self.segment = segment

    @property
    def position(self) -> tuple[int, str]:
        return self.n, self.prev


def take_verification_key(state: Folder) -> str | None:
    """The verification key, removed from the machine as it is handed over; None once it was taken."""
    try:
        text = state.read(VERIFY_NAME, 4096).decode("ascii").strip()
    except FileNotFoundError:
        return None
    seal.VerificationKey.parse(text)  # never hand over (and lose) something that is not one
    state.unlink(VERIFY_NAME)
    state.fsync()
    return text


def seal_status(state_dir: Path, enabled: bool) -> dict[str, object]:
    """What `apilogd status` says of sealing: on or off, the key's id and epoch, whether the verification key still waits here."""
    out: dict[str, object] = {"on": enabled, "key_id": None, "epoch": None,
                              "verification_key_waiting": (state_dir / VERIFY_NAME).exists()}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        key = json.loads((state_dir / KEY_NAME).read_bytes())
        out.update(key_id=str(key["id"]), epoch=int(key["epoch"]))
    return out
