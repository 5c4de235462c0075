"""Where an entry's lines go: one rendered line per valid stream file, and an INTERNAL note for problems."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from . import _streams
from ._entry import Entry
from ._render import render_jsonl, render_text
from ._tree import SYSTEM, BadLocation, encode_user, relative_path
from .settings import Settings


def render(entry: Entry, stream: str, location: str, settings: Settings, *,
           message: Any, heading: str | None, dict_to_string: bool) -> str:
    """One entry of `stream` in the configured format."""
    if settings.format == "jsonl":
        return render_jsonl(stream, message, entry_id=entry.id, location=location,
                            heading=heading, ts=entry.ts, tz=settings.tz)
    return render_text(stream, message, heading=heading, dict_to_string=dict_to_string,
                       ts=entry.ts if entry.timestamp else None, tz=settings.tz)


def route(entry: Entry, known: Collection[str], settings: Settings) -> list[tuple[str, str]]:
    """`(relative path, text)` for every line this entry writes; checks everything again on the way."""
    problems = list(entry.problems)
    streams = []
    for stream in entry.streams:
        if stream in known:  # registry names are normalized, so this checks the spelling too
            streams.append(stream)
        else:
            problems.append(f"unknown stream {stream!r}")
    try:
        encode_user(entry.location)
    except BadLocation as exc:
        problems.append(f"bad location: {exc}")
        streams = []
    suffix = settings.log_suffix
    lines = [
        (
            relative_path(stream, entry.location, suffix),
            render(entry, stream, entry.location, settings, message=entry.message,
                   heading=entry.heading, dict_to_string=entry.dict_to_string),
        )
        for stream in streams
    ]
    if problems:
        entry.problems = problems
        heading, body = entry.internal_note()
        note = render(entry, _streams.INTERNAL, SYSTEM, settings, message=body, heading=heading, dict_to_string=True)
        lines.append((relative_path(_streams.INTERNAL, SYSTEM, suffix), note))
    return lines
