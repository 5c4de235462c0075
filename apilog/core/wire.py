"""Celery protocol-2 task messages carrying one entry, in the JSON shape kombu's virtual transports store."""

from __future__ import annotations

import binascii
import json
import os
import socket
from typing import Any

import msgspec

from .entry import Entry
from .jsonsafe import without_surrogates

TASK_NAME = "apilog.log"
QUEUE = "apilog"
CONTENT_TYPE = "application/json"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_HOST = socket.gethostname()


class BadMessage(ValueError):
    """A spool or broker message that is not a JSON apilog task message."""


class _Headers(msgspec.Struct):
    task: Any = None


class _Properties(msgspec.Struct):
    body_encoding: Any = None


class _Stored(msgspec.Struct):
    """What apilogd reads of a stored message (kombu's virtual-transport form); the rest is skipped unread."""

    body: str
    content_type: Any = msgspec.field(default=None, name="content-type")
    headers: _Headers | None = None
    properties: _Properties | None = None


class _Arguments(msgspec.Struct):
    entry: Entry


class _OneOrSeveral(msgspec.Struct):
    entry: Entry | None = None
    entries: list[Entry] | None = None  # a forwarder's batch for one shard, in one message (brokers that count per message)


_encode = msgspec.json.Encoder().encode
_decode_stored = msgspec.json.Decoder(_Stored).decode
_decode_body = msgspec.json.Decoder(tuple[tuple[()], _Arguments, Any]).decode  # [args (none), kwargs, embed]
_decode_several = msgspec.json.Decoder(tuple[tuple[()], _OneOrSeveral, Any]).decode


def task_body(entry: Entry | dict[str, Any]) -> bytes:
    """The Celery body `[args, kwargs, embed]` for one entry (or, to forge a record in a test, any dict)."""
    if isinstance(entry, dict):
        return json.dumps([[], {"entry": entry}, _EMBED], separators=(",", ":")).encode()
    try:
        return _encode(((), {"entry": entry}, _EMBED))
    except UnicodeEncodeError:  # a lone surrogate, which UTF-8 (and so JSON here) cannot carry
        return _encode(((), {"entry": entry.to_wire()}, _EMBED))


def task_body_of_many(entries: list[Entry]) -> bytes:
    """The Celery body `[[], {"entries": [...]}, embed]`: several entries of one shard in one task message."""
    try:
        return _encode(((), {"entries": entries}, _EMBED))
    except UnicodeEncodeError:
        return _encode(((), {"entries": [e.to_wire() for e in entries]}, _EMBED))


def _envelope(task_id: str, body: str) -> dict[str, Any]:
    """The stored message around a base64 body: protocol-2 headers, kombu's virtual properties."""
    return {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": CONTENT_TYPE,
        "headers": {
            "lang": "py",
            "task": TASK_NAME,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": "{'entry': ...}",
            "origin": f"{os.getpid()}@{_HOST}",
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": task_id,
        },
    }


def task_headers(task_id: str) -> dict[str, Any]:
    """The protocol-2 headers of an entry's task message, for brokers that carry headers apart from the body."""
    headers: dict[str, Any] = _envelope(task_id, "")["headers"]
    return headers


_template: tuple[int, list[bytes]] = (-1, [])
_BODY_MARK, _ID_MARK = "\x00body\x00", "\x00id\x00"


def _pieces() -> list[bytes]:
    """The envelope's JSON cut at its body and id markers: [head, body, id, ...].

    Made once per process: the origin names the pid.
    """
    global _template
    if _template[0] != os.getpid():
        text = json.dumps(_envelope(_ID_MARK, _BODY_MARK), separators=(",", ":"))
        head, _, rest = text.partition(json.dumps(_BODY_MARK)[1:-1])
        _template = (os.getpid(), [head.encode()] + [p.encode() for p in rest.split(json.dumps(_ID_MARK)[1:-1])])
    return _template[1]


def encode(entry: Entry | dict[str, Any]) -> bytes:
    """One entry as the stored form of a Celery task message (what kombu's `_put` receives, as JSON).

    Filled into a template made from the same dict kombu would store: the body is base64, and
    the id is escaped as JSON.
    """
    body = binascii.b2a_base64(task_body(entry), newline=False)
    task_id = str(entry["id"]) if isinstance(entry, dict) else entry.id
    if not task_id.replace("-", "").isalnum():
        task_id = json.dumps(without_surrogates(task_id))[1:-1]  # apply_async(task_id=...) may name it anything
    head, *tail = _pieces()
    return head + body + task_id.encode().join(tail)


def decode(payload: bytes) -> Entry:
    """The entry carried by a stored message, checked; BadMessage for anything else (pickle included)."""
    try:
        message = _decode_stored(payload)
    except msgspec.ValidationError as exc:
        raise BadMessage(f"not an apilog task message: {exc}") from None
    except msgspec.DecodeError:
        raise BadMessage("not JSON") from None
    except RecursionError:  # nested past what the decoder follows: forged (delay() cuts at 64 levels)
        raise BadMessage("nested too deep") from None
    body: str | bytes = message.body
    if message.properties is not None and message.properties.body_encoding == "base64":
        try:
            body = binascii.a2b_base64(body, strict_mode=True)
        except (binascii.Error, ValueError):
            raise BadMessage("body is not valid base64") from None
    return decode_body(body, message.content_type, message.headers)


def _check_task(content_type: Any, headers: Any) -> None:
    """Refuse a message that is not JSON or not apilog's task, before its body is read."""
    if content_type != CONTENT_TYPE:
        raise BadMessage(f"content type {content_type!r} refused: only JSON is accepted")
    task = headers.get("task") if isinstance(headers, dict) else getattr(headers, "task", None)
    if task != TASK_NAME:
        raise BadMessage(f"task {task!r} is not {TASK_NAME!r}")


def decode_body(body: bytes | str, content_type: Any, headers: Any) -> Entry:
    """The entry in a Celery body; checks the serializer and the task name first."""
    _check_task(content_type, headers)
    try:
        return _decode_body(body)[1].entry
    except msgspec.ValidationError as exc:
        raise BadMessage(f"body is not [[], {{'entry': ...}}, embed] with one apilog entry: {exc}") from None
    except msgspec.DecodeError:
        raise BadMessage("body is not JSON") from None
    except RecursionError:
        raise BadMessage("body nested too deep") from None


def decode_entries(body: bytes | str, content_type: Any, headers: Any) -> list[Entry]:
    """The entries in a Celery body of one entry or of several (`task_body_of_many`)."""
    _check_task(content_type, headers)
    try:
        arguments = _decode_several(body)[1]
    except msgspec.ValidationError as exc:
        raise BadMessage(f"body is not [[], {{'entry' or 'entries': ...}}, embed] of apilog entries: {exc}") from None
    except msgspec.DecodeError:
        raise BadMessage("body is not JSON") from None
    except RecursionError:
        raise BadMessage("body nested too deep") from None
    if arguments.entries is not None:
        return arguments.entries
    if arguments.entry is None:
        raise BadMessage("body holds neither 'entry' nor 'entries'")
    return [arguments.entry]
