"""What the service loop drives: the writer of files (`BatchWriter`) or, on an app host, the forwarder (`Forwarder`)."""

from __future__ import annotations

from typing import Any, Protocol

from apilog.core.entry import Entry

from ..sources.base import Source
from ..state.folders import Folders
from ..state.ledger import Ledger
from ..state.probe import Probe
from .budget import DropNotes


class Drainer(Protocol):
    """Takes batches from its source and commits each, exactly once, where they go."""

    folders: Folders
    ledger: Ledger
    probe: Probe  # the crash probe: armed after an unclean exit
    notes: list[Entry]  # INTERNAL entries waiting for the next batch
    drop_notes: DropNotes  # the producers' drop counters, turned into suppression notes
    quarantined: int  # items set aside since the service last took the count

    @property
    def source(self) -> Source[Any]:
        """What it drains."""

    def step(self, *, only_notes: bool = False) -> int:
        """Commit one batch (or, `only_notes`, just the notes waiting); return how many items it took."""

    def checkpoint(self) -> None:
        """Make every committed batch durable where it went, and what the source acknowledged."""

    def close(self) -> None:
        """Release the source, files and folders."""
