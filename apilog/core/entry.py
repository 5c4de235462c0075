"""An entry: what one `delay()` call asks to log, checked and made JSON-safe in the caller."""

from __future__ import annotations

import itertools
import os
import secrets
import time
import uuid
from collections.abc import Iterable
from typing import Annotated, Any

import msgspec

from ..exceptions import StreamError
from . import streams as _streams
from .context import current_user
from .jsonsafe import jsonable, safe_str, without_surrogates
from .logfile import SYSTEM, BadLocation, dump_json, encode_user

WIRE_VERSION = 1
# Event times that every zone can write: years 2 to 9998 (a clock before 1970 is still a clock).
TS_MIN, TS_MAX = -62104060800.0, 253370764800.0
CUT_MARKER = " [cut by apilog: {kept} of {total} bytes kept]"


class Entry(msgspec.Struct, tag_field="v", tag=WIRE_VERSION):
    """One log entry, in the form that travels through the spool (decoded and checked in one pass, in C)."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    ts: Annotated[float, msgspec.Meta(ge=TS_MIN, le=TS_MAX)]
    streams: list[str]
    location: str
    message: str | dict[str, Any]
    heading: str | None = None
    dict_to_string: bool = False
    timestamp: bool = True
    problems: list[str] = []
    original: dict[str, Any] | None = None  # what the caller passed, kept when a problem was found

    def to_wire(self) -> dict[str, Any]:
        """The entry as plain JSON data (a Celery task's `entry` argument)."""
        wire: dict[str, Any] = without_surrogates(msgspec.to_builtins(self))
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> Entry:
        """Rebuild an entry from plain JSON data; ValueError saying what is wrong when it is not one."""
        try:
            return msgspec.convert(wire, cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"not an apilog entry: {exc}") from None

    def internal_note(self) -> tuple[str, dict[str, Any]]:
        """Heading and body of the INTERNAL entry that reports this entry's problems, content kept."""
        body = {"id": self.id, **(self.original or {})}
        body.setdefault("stream", self.streams)
        body.setdefault("location", self.location)
        body["message"] = self.message
        body["heading"] = self.heading
        return "rejected input: " + "; ".join(self.problems), body


class _Ids:
    """Entry ids in uuid form: 74 random bits drawn per process (again after a fork), then a counter."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix = str(uuid.uuid4())[:24]  # xxxxxxxx-xxxx-4xxx-yxxx-: version and variant kept
        self.counter = itertools.count(secrets.randbits(40))

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFF:012x}"


new_id = _Ids()  # a third of uuid4()'s cost; unique across hosts as long as 74 random bits are


def build(
    stream: Any = None,
    location: Any = None,
    message: Any = None,
    *,
    timestamp: bool | None = None,
    heading: Any = None,
    dict_to_string: bool = False,
    m: Any = None,
    registry: _streams.Registry,
    timestamps_default: bool,
    max_entry_bytes: int,
) -> tuple[Entry, bool]:
    """Check one call's arguments; return the entry and whether SCREEN was asked for."""
    ts = time.time()  # the event time is the call's, not the write's
    problems: list[str] = []
    both = message is not None and m is not None
    if both:
        problems.append("both message and m were given; m kept here")
    elif message is None:
        message = m
    body = _message(message)

    streams, screen = _targets(stream, registry, problems)
    where = _location(location, problems)
    if where is None:
        streams, where = [], SYSTEM

    head = None if heading is None else (heading if isinstance(heading, str) else safe_str(heading))
    if timestamp is None:
        timestamp = timestamps_default
    elif not isinstance(timestamp, bool):
        problems.append(f"timestamp must be True or False, got {safe_str(timestamp)!r}")
        timestamp = bool(timestamp)
    if not isinstance(dict_to_string, bool):
        problems.append("dict_to_string must be True or False")
        dict_to_string = bool(dict_to_string)

    body, head = cut(body, head, max_entry_bytes, problems)
    original = None
    if problems:  # what the caller passed, for the INTERNAL report
        original = {"stream": jsonable(stream), "location": jsonable(location)}
        if both:
            original["m"] = jsonable(m)
    entry = Entry(
        id=new_id(),
        ts=ts,
        streams=streams,
        location=where,
        message=body,
        heading=head,
        dict_to_string=dict_to_string,
        timestamp=timestamp,
        problems=problems,
        original=original,
    )
    return entry, screen


def _message(message: Any) -> str | dict[str, Any]:
    if message is None:
        return ""
    if isinstance(message, str):
        return message
    if isinstance(message, dict):
        plain: dict[str, Any] = jsonable(message)
        return plain
    return safe_str(message)


def _targets(stream: Any, registry: _streams.Registry, problems: list[str]) -> tuple[list[str], bool]:
    if stream is None:
        return ["INFO"], False
    if isinstance(stream, str):
        pieces: Iterable[Any] = stream.split(",")
    elif isinstance(stream, (list, tuple)):
        pieces = stream
    else:
        problems.append(f"stream must be a name or a list of names, got {type(stream).__name__}")
        return [], False
    known = registry.names(cached=True)
    streams: list[str] = []
    screen = False
    for piece in pieces:
        if not isinstance(piece, str):
            problems.append(f"stream names must be strings, got {type(piece).__name__}")
            continue
        if not piece.strip():
            continue
        try:
            name = _streams.normalize(piece)
        except StreamError as exc:
            problems.append(str(exc))
            continue
        if name == _streams.SCREEN:
            screen = True
        elif name not in known and name not in (known := registry.names()):  # added a moment ago?
            problems.append(f"unknown stream {name!r}")
        elif name not in streams:
            streams.append(name)
    if not streams and not screen and not problems:
        problems.append("no stream named")
    return streams, screen


def _location(location: Any, problems: list[str]) -> str | None:
    if location is None:
        location = current_user() or SYSTEM
    elif isinstance(location, int) and not isinstance(location, bool):
        location = str(location)  # numeric user ids are common and unambiguous
    if not isinstance(location, str):
        problems.append(f"location must be a string, got {type(location).__name__}")
        return None
    try:
        encode_user(location)
    except BadLocation as exc:
        problems.append(f"bad location: {exc}")
        return None
    return location


def cut(body: Any, heading: str | None, limit: int, problems: list[str]) -> tuple[Any, str | None]:
    """Bound the entry's size: a heading to a quarter of the limit, the body to the rest."""
    if heading is not None and len(heading.encode("utf-8", "surrogatepass")) > limit // 4:
        heading, total = _cut_text(heading, limit // 4)
        problems.append(f"heading cut to {limit // 4} of {total} bytes (APILOG_MAX_ENTRY_BYTES={limit})")
    room = limit - (len(heading.encode("utf-8", "surrogatepass")) if heading else 0)
    text = body if isinstance(body, str) else dump_json(body)
    if len(text) * 4 <= room or len(text.encode("utf-8", "surrogatepass")) <= room:
        return body, heading
    cut, total = _cut_text(text, room)
    problems.append(f"entry cut to {room} of {total} bytes (APILOG_MAX_ENTRY_BYTES={limit})")
    return cut, heading


def _cut_text(text: str, limit: int) -> tuple[str, int]:
    raw = text.encode("utf-8", "surrogatepass")
    kept = raw[:limit].decode("utf-8", "ignore")
    marker = CUT_MARKER.format(kept=len(kept.encode("utf-8", "surrogatepass")), total=len(raw))
    return kept + marker, len(raw)


def internal(heading: str, body: dict[str, Any]) -> Entry:
    """An entry apilog writes about itself to system INTERNAL."""
    return Entry(
        id=new_id(),
        ts=time.time(),
        streams=[_streams.INTERNAL],
        location=SYSTEM,
        message=jsonable(body),
        heading=heading,
        dict_to_string=True,
    )
