"""How an entry is written: the `text` and `jsonl` formats of SPEC 6, escaping included."""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime, tzinfo
from typing import Any

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
