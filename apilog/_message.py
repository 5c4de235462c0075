"""Celery protocol-2 task messages carrying one entry, in the JSON shape kombu's virtual transports store."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
from typing import Any

TASK_NAME = "apilog.log"
QUEUE = "apilog"
CONTENT_TYPE = "application/json"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_HOST = socket.gethostname()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity; strict readers of jsonl do not


_json = json.JSONDecoder(parse_constant=_no_constant)  # no encoding sniffing: messages are UTF-8 by contract


class BadMessage(ValueError):
    """A spool or broker message that is not a JSON apilog task message."""


def task_body(entry_wire: dict[str, Any]) -> bytes:
    """The Celery body `[args, kwargs, embed]` for one entry."""
    return json.dumps([[], {"entry": entry_wire}, _EMBED], separators=(",", ":")).encode()


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


_ID, _BODY = json.dumps("\x00id\x00")[1:-1], json.dumps("\x00body\x00")[1:-1]
_template: tuple[int, list[str]] = (-1, [])


def _pieces() -> list[str]:
    """The envelope's JSON split around its id and body markers, made once per process (the origin names the pid)."""
    global _template
    if _template[0] != os.getpid():
        text = json.dumps(_envelope("\x00id\x00", "\x00body\x00"), separators=(",", ":"))
        _template = (os.getpid(), re.split(f"({re.escape(_ID)}|{re.escape(_BODY)})", text))
    return _template[1]


def encode(entry_wire: dict[str, Any]) -> bytes:
    """One entry as the stored form of a Celery task message (what kombu's `_put` receives, as JSON).

    Filled into a template made from the same dict kombu would store: the id is a uuid and the
    body base64, so neither needs escaping.
    """
    body = base64.b64encode(task_body(entry_wire)).decode("ascii")
    task_id = entry_wire["id"]
    fill = {_ID: task_id, _BODY: body}
    return "".join([fill.get(piece, piece) for piece in _pieces()]).encode()


def decode(payload: bytes) -> dict[str, Any]:
    """The entry carried by a stored message; BadMessage for anything else (pickle included)."""
    try:
        message = _json.decode(payload.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise BadMessage("not JSON") from None
    if not isinstance(message, dict):
        raise BadMessage("not a message object")
    body = message.get("body")
    properties = message.get("properties") or {}
    if not isinstance(body, str) or not isinstance(properties, dict):
        raise BadMessage("message has no body")
    if properties.get("body_encoding") == "base64":
        try:
            body = base64.b64decode(body, validate=True)
        except ValueError:
            raise BadMessage("body is not valid base64") from None
    return decode_body(body, message.get("content-type"), message.get("headers"))


def decode_body(body: bytes | str, content_type: Any, headers: Any) -> dict[str, Any]:
    """The entry in a Celery body; checks the serializer and the task name first."""
    if content_type != CONTENT_TYPE:
        raise BadMessage(f"content type {content_type!r} refused: only JSON is accepted")
    task = headers.get("task") if isinstance(headers, dict) else None
    if task != TASK_NAME:
        raise BadMessage(f"task {task!r} is not {TASK_NAME!r}")
    try:
        args, kwargs, _embed = _json.decode(body.decode("utf-8") if isinstance(body, bytes) else body)
        entry = kwargs["entry"]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise BadMessage("body is not [args, {'entry': ...}, embed]") from None
    if args or not isinstance(entry, dict):
        raise BadMessage("body does not carry one entry")
    return entry
