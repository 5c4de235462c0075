"""Where an entry's lines go: one rendered line per valid stream file, and an INTERNAL note for problems."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from ..settings import Settings
from . import streams as _streams
from .entry import Entry, cut
from .logfile import SYSTEM, BadLocation, dump_json, encode_user, relative_path, render_jsonl, render_text


def render(entry: Entry, stream: str, location: str, settings: Settings, *,
           message: Any, heading: str | None, dict_to_string: bool) -> str:
    """One entry of `stream` in the configured format."""
    if settings.format == "jsonl":
        return render_jsonl(stream, message, entry_id=entry.id, location=location,
                            heading=heading, ts=entry.ts, tz=settings.tz)
    return render_text(stream, message, heading=heading, dict_to_string=dict_to_string,
                       ts=entry.ts if entry.timestamp else None, tz=settings.tz)


RENDERED_FACTOR = 4  # escapes may quadruple a line; more than that is amplification, not text


_NESTING = re.compile(r"[\[\]{}]")


def _indented_size(message: dict[str, Any]) -> int:
    """About how large `message` renders with a 4-space indent, found from its compact JSON (C-fast)."""
    compact = dump_json(message)
    opened = compact.count("{") + compact.count("[")
    depth = deepest = 0
    if opened > 16:  # a shallow dict needs no closer look
        for bracket in _NESTING.finditer(compact):
            depth += 1 if bracket.group() in "[{" else -1
            deepest = max(deepest, depth)
    else:
        deepest = opened
    lines = compact.count(",") + 2 * opened
    return len(compact) + lines * 4 * deepest


def route(entry: Entry, known: Collection[str], settings: Settings) -> list[tuple[str, str]]:
    """`(relative path, text)` for every line this entry writes; checks everything again on the way."""
    problems = list(entry.problems)
    streams = []
    for stream in dict.fromkeys(entry.streams):  # once each, however often a forged record names it
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
    message, heading, dict_to_string = entry.message, entry.heading, entry.dict_to_string
    limit = settings.max_entry_bytes
    if (isinstance(message, str) and len(message) > limit) or (heading is not None and len(heading) > limit // 4):
        message, heading = cut(message, heading, limit, problems)  # a forger skips the caller's cut; we do not
    if dict_to_string and isinstance(message, dict) and _indented_size(message) > RENDERED_FACTOR * limit:
        problems.append("written compact: indented, it would be over "
                        f"{RENDERED_FACTOR} x APILOG_MAX_ENTRY_BYTES={limit}")
        dict_to_string = False
    lines = []
    for stream in streams:
        text = render(entry, stream, entry.location, settings, message=message, heading=heading,
                      dict_to_string=dict_to_string)
        if len(text) > RENDERED_FACTOR * limit and not isinstance(message, str):
            # A small dict can render huge (indenting 900 levels): bound it as the caller bounds text.
            message, heading = cut(dump_json(message), heading, limit, problems)
            dict_to_string = False
            text = render(entry, stream, entry.location, settings, message=message, heading=heading,
                          dict_to_string=False)
        lines.append((relative_path(stream, entry.location, suffix), text))
    if problems:
        entry.problems = problems
        heading, body = entry.internal_note()
        readable = _indented_size(body) <= RENDERED_FACTOR * limit
        note = render(entry, _streams.INTERNAL, SYSTEM, settings, message=body, heading=heading,
                      dict_to_string=readable)
        lines.append((relative_path(_streams.INTERNAL, SYSTEM, suffix), note))
    return lines
