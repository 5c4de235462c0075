"""The consumer's ledger: committed offset per segment as of the last checkpoint of the journal.

Batches are committed in the journal (journal.py); a checkpoint saves the offsets they
moved to here, with the number of the last journal record they cover, and empties the
journal. A ledger of the version before the journal may still carry a `pending` batch:
recovery undoes it by cutting each file back to its recorded size.

The ledger is checked whole when it is read: a damaged one is set aside and apilogd
refuses to drain until `apilogd repair` has rebuilt it, since guessing offsets would
write entries twice or skip them.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, NoReturn

from apilog.core.folder import Folder
from apilog.core.logfile import ARCHIVE, SYSTEM, USERS
from apilog.core.seal import SEALS
from apilog.spool.backlog import LEDGER_NAME

from ..exceptions import StateDamaged

DAMAGED = "damaged"  # suffix of a ledger set aside, until `apilogd repair` handles it
REPAIRED = "repaired"
REPAIR_HINT = "run `apilogd repair`, then start apilogd again"
LIVED_NAME = "probe"  # made at a daemon's first start (state/probe.py); its presence means one ran here


def is_entry_id(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= 64


def is_segment_name(name: object) -> bool:
    if type(name) is not str or not 0 < len(name) <= 255 or "/" in name or "\0" in name or name in (".", ".."):
        return False
    try:
        os.fsencode(name)  # a lone surrogate names no file
    except UnicodeEncodeError:
        return False
    return True


def is_relpath(path: object) -> bool:
    """A path apilogd writes below the log folder."""
    if type(path) is not str or "\0" in path:
        return False
    parts = path.split("/")
    return len(parts) >= 2 and parts[0] in (SYSTEM, USERS, ARCHIVE, SEALS) and all(is_segment_name(p) for p in parts)


def _offsets(value: object, what: str, check: Any = is_segment_name) -> dict[str, int]:
    if type(value) is not dict:
        raise ValueError(f"{what} is not an object")
    for key, offset in value.items():
        if not check(key):
            raise ValueError(f"{what} names {str(key)[:80]!r}, which is not a name apilogd writes")
        if type(offset) is not int or offset < 0:
            raise ValueError(f"{what}[{str(key)[:80]!r}] is {str(offset)[:40]!r}, not a size")
    return value


class Parsed(NamedTuple):
    offsets: dict[str, int]
    pending: dict[str, Any] | None  # a batch in flight, as the version before the journal recorded it
    last_ids: list[str]
    checkpoint: int | None  # the last journal record these offsets cover; None: a ledger older than the journal
    seal: tuple[int, str] | None  # the seal log's last line as of the checkpoint: (number, digest)


def parse(raw: bytes) -> Parsed:
    """What a ledger says; ValueError saying what is wrong with it."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError("not JSON" if raw.strip() else "empty") from None
    if type(data) is not dict:
        raise ValueError("not a JSON object")
    offsets = _offsets(data.get("offsets", {}), "offsets")
    pending = data.get("pending")
    if pending is not None:
        if type(pending) is not dict:
            raise ValueError("pending is not an object")
        _offsets(pending.get("files"), "pending files", is_relpath)
        _offsets(pending.get("offsets"), "pending offsets")
    last_ids = data.get("last_ids", [])
    if type(last_ids) is not list or not all(is_entry_id(i) for i in last_ids):
        raise ValueError("last_ids is not a list of entry ids")
    checkpoint = data.get("checkpoint")
    if checkpoint is not None and (type(checkpoint) is not int or checkpoint < 0):
        raise ValueError("checkpoint is not a journal record number")
    seal = data.get("seal")
    if seal is not None:
        if (type(seal) is not list or len(seal) != 2 or type(seal[0]) is not int or seal[0] < 0
                or type(seal[1]) is not str or len(seal[1]) > 64):
            raise ValueError("seal is not a seal line's number and digest")
        seal = (seal[0], seal[1])
    return Parsed(offsets, pending, last_ids, checkpoint, seal)


def unrepaired(state: Folder, name: str) -> str | None:
    """The name of a copy of state file `name` set aside as damaged and not yet repaired, if any."""
    for found in sorted(state.names()):
        if found.startswith(f"{name}.{DAMAGED}") and not found.endswith(f".{REPAIRED}"):
            return found
    return None


def refuse_unrepaired(state: Folder, name: str) -> None:
    """A state file missing while its damaged copy waits for `apilogd repair`: starting afresh would lose track."""
    aside = unrepaired(state, name)
    if aside is not None:
        raise StateDamaged(f"{state.path / aside} is a damaged {name} set aside and not repaired yet; {REPAIR_HINT}")


class Ledger:
    """Committed offsets as of the last checkpoint, replaced atomically at each one."""

    def __init__(self, state: Folder, *, durable: bool) -> None:
        self.state = state
        self.path = state.path / LEDGER_NAME
        self.durable = durable
        try:
            raw = state.read(LEDGER_NAME)
        except FileNotFoundError:
            refuse_unrepaired(state, LEDGER_NAME)
            if state.exists(LIVED_NAME):  # a daemon ran here before: the ledger was lost, not never made
                raise StateDamaged(f"{self.path} is missing, though apilogd ran here before "
                                   f"({state.path / LIVED_NAME} exists); nothing was written; {REPAIR_HINT}") from None
            raw = b"{}"
        except OSError as exc:  # a folder, a link or a FIFO in its place
            self.damaged(f"not a plain file: {exc.strerror or exc}")
        try:
            self.offsets, self.pending, self.last_ids, checkpoint, self.seal = parse(raw)
        except ValueError as exc:
            self.damaged(str(exc))
        self.journaled = checkpoint is not None  # saved by a version that keeps a journal
        self.checkpoint = checkpoint or 0
        self.save()  # from now on its absence means it was lost

    def damaged(self, why: str) -> NoReturn:
        """Set the ledger aside and refuse to go on: one line naming the file and the way out."""
        aside = self.state.set_aside(LEDGER_NAME, DAMAGED)
        raise StateDamaged(f"{self.path} is damaged ({why}); moved to {self.state.path / aside}; "
                           f"nothing was written; {REPAIR_HINT}")

    def advance(self, positions: dict[str, int]) -> None:
        """A committed batch moved these offsets (never backwards: a journal replayed twice changes nothing)."""
        offsets = self.offsets
        for name, offset in positions.items():
            if offset > offsets.get(name, -1):
                offsets[name] = offset

    def abort(self) -> None:
        """The batch in flight of a ledger before the journal was undone: forget it, keep the offsets."""
        self.pending = None
        self.save()

    def forget(self, segment: str) -> None:
        """A segment was removed; its offset goes with the next save."""
        self.offsets.pop(segment, None)

    def save(self) -> None:
        state = {"offsets": self.offsets, "pending": self.pending, "last_ids": self.last_ids,
                 "checkpoint": self.checkpoint, "seal": self.seal}
        body = json.dumps(state, separators=(",", ":"))
        self.state.write_atomic(LEDGER_NAME, body.encode(), durable=self.durable)
