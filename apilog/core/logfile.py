"""The on-disk format of the log tree, written by apilogd and parsed by readers: names, entries, archives.

- Names (docs/reference.md, "The log tree"): `system/` and `users/<encoded user>/`, one file per stream, spaces in its
  name turned to `_`; archives under `archive/` as `<stem>.<UTC stamp>[-N].<suffix>[.gz]`.
- Entries (docs/reference.md, "Entry format"): `text` (`STREAM:  body § [stamp]`, or a heading line and an indented body)
  or `jsonl` (one JSON object per line).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from .streams import INTERNAL

# --- names -------------------------------------------------------------------------------

SYSTEM = "system"
SUFFIXES = {"text": ".log", "jsonl": ".jsonl"}  # by APILOG_FORMAT
USERS = "users"
MAX_COMPONENT = 255

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._@+-")
_ESCAPE = re.compile(r"%([0-9A-F]{2})")


class BadLocation(ValueError):
    """A location cannot name a user directory."""


@functools.lru_cache(maxsize=65536)  # a drain over tens of thousands of users looks each up per entry
def encode_user(location: str) -> str:
    """Encode a location reversibly as one safe path component (docs/reference.md, "The log tree")."""
    if not location:
        raise BadLocation("empty location")
    try:
        raw = location.encode("utf-8")
    except UnicodeEncodeError:
        raise BadLocation("location is not valid Unicode text") from None
    out = "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)
    if out.startswith("."):
        out = "%2E" + out[1:]
    if len(out.encode()) > MAX_COMPONENT:
        raise BadLocation(f"location is over {MAX_COMPONENT} bytes once encoded")
    return out


def decode_user(component: str) -> str:
    """Invert `encode_user`."""
    raw = bytearray()
    i = 0
    while i < len(component):
        match = _ESCAPE.match(component, i)
        if match:
            raw.append(int(match.group(1), 16))
            i = match.end()
        else:
            raw.extend(component[i].encode())
            i += 1
    return raw.decode("utf-8", errors="replace")


def relative_path(stream: str, location: str, suffix: str) -> str:
    """Where an entry of `stream` for `location` lives, relative to the log root."""
    name = file_stem(stream) + suffix
    return f"{SYSTEM}/{name}" if stream == INTERNAL else f"{user_dir(location)}/{name}"


def user_dir(location: str) -> str:
    """The folder, relative to the log root, that holds `location`'s files."""
    return SYSTEM if location == SYSTEM else f"{USERS}/{encode_user(location)}"


def file_stem(stream: str) -> str:
    """The stream's file name without suffix: spaces become underscores."""
    return stream.replace(" ", "_")


# --- writing entries ---------------------------------------------------------------------

STAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
SECTION = "\u00a7"
BODY_INDENT = "    "  # keeps a plain body off column 0, where only an entry's first line starts

# Everything a terminal or a line-splitting reader could take as a control or a line break,
# and lone surrogates, which UTF-8 cannot carry.
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_line(text: str) -> str:
    """Make `text` safe as one line: backslash, CR, LF and controls become escapes."""
    return _UNSAFE.sub(_escape_char, text)


def _json_char(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def dump_json(value: Any, *, indent: int | None = None) -> str:
    """JSON with real Unicode kept readable, but no raw control or line-separator character."""
    separators = (",", ": ") if indent else (",", ":")
    text = json.dumps(value, ensure_ascii=False, indent=indent, separators=separators)
    return _JSON_UNSAFE.sub(_json_char, text)


def stamp(ts: float, tz: tzinfo | None) -> str:
    """The written form of an event time: `YYYY-MM-DD HH:MM:SS` in the configured zone."""
    return _stamp_second(int(ts // 1), tz)


@functools.lru_cache(maxsize=256)
def _stamp_second(second: int, tz: tzinfo | None) -> str:
    # Entries of one second share a stamp; a batch holds thousands of them.
    return datetime.fromtimestamp(second, tz).strftime(STAMP_FORMAT)


def _body(message: Any, dict_to_string: bool) -> str:
    if isinstance(message, str):
        return escape_line(message)
    return dump_json(message, indent=4 if dict_to_string else None)


def render_text(
    stream: str,
    message: Any,
    *,
    heading: str | None,
    dict_to_string: bool,
    ts: float | None,
    tz: tzinfo | None,
) -> str:
    """One entry in the `text` format, ending with a newline."""
    body = _body(message, dict_to_string)
    tail = f" {SECTION} [{stamp(ts, tz)}]\n" if ts is not None else "\n"
    if heading is None:
        return f"{stream}:  {body}{tail}"
    if isinstance(message, str):
        body = BODY_INDENT + body
    return f"{stream}: {escape_line(heading)}\n{body}{tail}"


def render_jsonl(
    stream: str,
    message: Any,
    *,
    entry_id: str,
    location: str,
    heading: str | None,
    ts: float,
    tz: tzinfo | None,
) -> str:
    """One entry in the `jsonl` format: a JSON object on one line."""
    record = {
        "id": entry_id,
        "ts": datetime.fromtimestamp(ts, tz).astimezone(tz).isoformat(timespec="microseconds"),
        "stream": stream,
        "location": location,
        "message": message,
        "heading": heading,
    }
    return dump_json(record) + "\n"


# --- reading entries back -----------------------------------------------------------------

_ENTRY_START = re.compile(r"^(?P<stream>[A-Z0-9_-]+(?: [A-Z0-9_-]+)*):(?: |  )")
_TEXT_STAMP = re.compile(f" {SECTION} \\[(\\d{{4}}-\\d\\d-\\d\\d \\d\\d:\\d\\d:\\d\\d)\\]$")
_HEAD_TEXT_STAMP = re.compile(f" {SECTION} \\[(\\d{{4}}-\\d\\d-\\d\\d \\d\\d:\\d\\d:\\d\\d)\\]".encode())
_HEAD_JSONL_TS = re.compile(rb'"ts":"([^"]+)"')


@dataclass(frozen=True, slots=True)
class Written:
    """One entry as found in a file: its stream, its event time if it carries one, and its text as written."""

    stream: str
    ts: float | None
    text: str
    source: str  # the file, relative to the log root


def _stamp_time(text: str, tz: tzinfo | None) -> float:
    when = datetime.strptime(text, STAMP_FORMAT)  # noqa: DTZ007 - the zone is the settings', applied here
    return (when.replace(tzinfo=tz) if tz else when).timestamp()


def parse(text: str, source: str, fmt: str, tz: tzinfo | None) -> Iterator[Written]:
    """Entries of one file, text or jsonl; a multi-line text entry runs until the next entry's first line."""
    if fmt == "jsonl":
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
        match = _ENTRY_START.match(line)
        if match and lines:
            yield _text_entry(stream, lines, source, tz)
            lines = []
        if match and not lines:
            stream = match["stream"]
        lines.append(line)
    if lines:
        yield _text_entry(stream, lines, source, tz)


def _text_entry(stream: str, lines: list[str], source: str, tz: tzinfo | None) -> Written:
    match = _TEXT_STAMP.search(lines[-1].rstrip("\n"))
    return Written(stream, _stamp_time(match.group(1), tz) if match else None, "".join(lines), source)


def first_time(head: bytes, fmt: str, tz: tzinfo | None) -> float | None:
    """The event time of the first stamped entry in a file's first bytes, or None."""
    if fmt == "jsonl":
        match = _HEAD_JSONL_TS.search(head)
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(match.group(1).decode()).timestamp() if match else None
        return None
    match = _HEAD_TEXT_STAMP.search(head)
    with contextlib.suppress(ValueError):
        return _stamp_time(match.group(1).decode(), tz) if match else None
    return None


# --- archive names ------------------------------------------------------------------------

ARCHIVE = "archive"
_ARCHIVE_NAME = re.compile(
    r"^(?P<stem>.+)\.(?P<stamp>\d{8}T\d{6}Z)(?:-(?P<n>\d+))?(?P<suffix>\.log|\.jsonl)(?P<gz>\.gz)?(?P<tmp>\.tmp)?$"
)


def archive_name(live_name: str, stamp: str, counter: int) -> str:
    """`INFO.log` rotated at `stamp` -> `INFO.<stamp>[-N].log` (gzip adds `.gz`)."""
    stem, _, suffix = live_name.rpartition(".")
    return f"{stem}.{stamp}{f'-{counter}' if counter else ''}.{suffix}"


def parse_archive_name(name: str) -> re.Match[str] | None:
    """The parts of an archive's file name, or None for anything else."""
    return _ARCHIVE_NAME.match(name)


def archive_order(name: str) -> tuple[str, str, int]:
    """Sort key putting a file's archives in rotation order (the counter counts numerically)."""
    match = _ARCHIVE_NAME.match(name)
    if match is None:
        return (name, "", 0)
    return (match["stem"], match["stamp"], int(match["n"] or 0))
