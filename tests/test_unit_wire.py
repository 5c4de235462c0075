"""The wire format (apilog/core/wire.py, apilog/core/entry.py) as properties: entries round-trip; anything else is BadMessage."""

from __future__ import annotations

import binascii
import json
import pickle
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apilog.core import wire
from apilog.core.entry import Entry, build
from apilog.core.jsonsafe import without_surrogates
from apilog.core.streams import DEFAULT_STREAMS, Registry

FAST = settings(max_examples=100, deadline=None)
REGISTRY = Registry(Path("/nonexistent"))  # the default streams

# Text as callers pass it: any character, lone surrogates included (UTF-8 has none: they travel as their escape text).
TEXT = st.text(st.characters(), max_size=40) | st.text(st.characters(categories=["Cs", "Cc", "Zl", "Zp"]), max_size=6)
PLAIN = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | PLAIN,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(PLAIN, inner, max_size=4), max_leaves=12)
MESSAGES = TEXT | st.dictionaries(PLAIN, JSON_VALUES, max_size=5) | st.dictionaries(TEXT, TEXT, max_size=3)
USERS = st.text(st.characters(), min_size=1, max_size=30) | st.sampled_from(["system", "usera1@gizzleMail.com", "../etc"])
STREAMS = (st.lists(st.sampled_from([*DEFAULT_STREAMS, "SCREEN", "info", " warn "]), min_size=1, max_size=3)
           | st.sampled_from(["INFO", "SCREEN,WARN", "SECURITY ALERT, LOGIN"]) | TEXT)


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    """An entry as `delay()` builds it from whatever a caller passed."""
    entry, _ = build(draw(STREAMS), draw(USERS), draw(MESSAGES), heading=draw(st.none() | TEXT),
                     timestamp=draw(st.booleans()), dict_to_string=draw(st.booleans()), registry=REGISTRY,
                     timestamps_default=True, max_entry_bytes=draw(st.sampled_from([1024, 65536])))
    return entry


def _without_surrogates(entry: Entry) -> Entry:
    """What the spool can carry of an entry: lone surrogates written as their `\\udXXX` escape text."""
    return Entry.from_wire(entry.to_wire())


# ---------------------------------------------------------------- entries round-trip


@FAST
@given(entry=entries())
def test_any_entry_round_trips(entry: Entry) -> None:
    """Whatever the caller passed, the stored task message decodes to the very entry (lone surrogates as escape text)."""
    decoded = wire.decode(wire.encode(entry))
    assert decoded == _without_surrogates(entry)
    try:
        msgspec.json.encode(entry)
    except UnicodeEncodeError:
        return  # it holds a lone surrogate
    assert decoded == entry


@FAST
@given(entry=entries())
def test_the_stored_message_is_celerys(entry: Entry) -> None:
    """The stored form is kombu's: JSON, content type application/json, task apilog.log, body base64 of [[], {entry}, embed]."""
    stored = json.loads(wire.encode(entry))
    assert stored["content-type"] == "application/json" and stored["headers"]["task"] == "apilog.log"
    assert stored["headers"]["id"] == stored["properties"]["correlation_id"]
    assert stored["properties"]["body_encoding"] == "base64"
    args, kwargs, embed = json.loads(binascii.a2b_base64(stored["body"]))
    assert args == [] and set(kwargs) == {"entry"} and set(embed) == {"callbacks", "errbacks", "chain", "chord"}
    assert Entry.from_wire(kwargs["entry"]) == _without_surrogates(entry)
    assert wire.decode_body(binascii.a2b_base64(stored["body"]), stored["content-type"], stored["headers"]) == \
        _without_surrogates(entry)


@FAST
@given(batch=st.lists(entries(), min_size=1, max_size=4))
def test_several_entries_in_one_body_round_trip(batch: list[Entry]) -> None:
    """A forwarder's body of several entries of one shard decodes to them in order; a one-entry body reads the same way."""
    headers = wire.task_headers("t-1")
    decoded = wire.decode_entries(wire.task_body_of_many(batch), wire.CONTENT_TYPE, headers)
    assert decoded == [_without_surrogates(e) for e in batch]
    assert wire.decode_entries(wire.task_body(batch[0]), wire.CONTENT_TYPE, headers) == [_without_surrogates(batch[0])]


@FAST
@given(entry=entries(), task_id=TEXT.filter(bool))
def test_any_task_id_keeps_the_message_json(entry: Entry, task_id: str) -> None:
    """A task id may be anything `apply_async(task_id=...)` was given: the stored message stays JSON and decodes."""
    wired = entry.to_wire() | {"id": without_surrogates(task_id)[:64]}
    stored = wire.encode(wired)
    assert json.loads(stored)["headers"]["id"] == without_surrogates(task_id)
    decoded = wire.decode(stored)
    assert decoded.id == wired["id"] and decoded.message == _without_surrogates(entry).message


# ---------------------------------------------------------------- anything else is refused


def _stored(body: bytes, **changes: Any) -> bytes:
    """A stored message around `body` (base64), with some fields of kombu's envelope changed."""
    entry, _ = build("INFO", "ann", "hello", registry=REGISTRY, timestamps_default=True, max_entry_bytes=65536)
    stored = json.loads(wire.encode(entry))
    stored["body"] = binascii.b2a_base64(body, newline=False).decode()
    for key, value in changes.items():
        if key == "task":
            stored["headers"]["task"] = value
        else:
            stored[key] = value
    return json.dumps(stored).encode()


def _sound_body() -> bytes:
    entry, _ = build("INFO", "ann", "hello", registry=REGISTRY, timestamps_default=True, max_entry_bytes=65536)
    return wire.task_body(entry)


@FAST
@given(payload=st.binary(max_size=200))
@example(payload=b"")
@example(payload=b"null")
@example(payload=b'{"body": 1}')
@example(payload=b'{"body": "", "properties": {"body_encoding": "base64"}}')
@example(payload=b'{"body": "\\u00e9", "properties": {"body_encoding": "base64"}}')
@example(payload=pickle.dumps({"body": "x"}))
def test_random_bytes_are_refused(payload: bytes) -> None:
    """Bytes that are not a stored task message raise BadMessage (a ValueError), never anything else."""
    with pytest.raises(wire.BadMessage):
        wire.decode(payload)


@FAST
@given(task=st.one_of(TEXT, st.integers(), st.none(), st.lists(st.integers(), max_size=2)).filter(lambda t: t != "apilog.log"))
@example(task="celery.ping")
@example(task="apilog.log ")
def test_another_task_is_refused(task: Any) -> None:
    """A message of any other task (or none) is refused before its body is read, even when the body is an entry's."""
    with pytest.raises(wire.BadMessage) as caught:
        wire.decode(_stored(_sound_body(), task=task))
    # A lone surrogate's escape is not JSON msgspec takes: refused as a whole, before the task is looked at.
    assert "is not 'apilog.log'" in str(caught.value) or str(caught.value) == "not JSON"


@FAST
@given(content_type=st.one_of(TEXT, st.none(), st.integers()).filter(lambda c: c != "application/json"))
@example(content_type="application/x-python-serialize")
@example(content_type="application/x-yaml")
@example(content_type="application/JSON")
def test_another_content_type_is_refused(content_type: Any) -> None:
    """Only JSON is accepted: pickle (kombu's application/x-python-serialize) or any other type is refused unread."""
    with pytest.raises(wire.BadMessage) as caught:
        wire.decode(_stored(_sound_body(), **{"content-type": content_type}))
    assert "only JSON is accepted" in str(caught.value) or str(caught.value) == "not JSON"  # (a lone surrogate's escape)


def test_a_pickled_body_is_refused_unread() -> None:
    """A pickle body is never unpickled: refused for its content type, and as not JSON when it claims to be JSON."""
    payload = pickle.dumps(((), {"entry": {"id": "x"}}, {}))
    with pytest.raises(wire.BadMessage, match="only JSON is accepted"):
        wire.decode(_stored(payload, **{"content-type": "application/x-python-serialize"}))
    with pytest.raises(wire.BadMessage, match="not JSON"):
        wire.decode(_stored(payload))
    with pytest.raises(wire.BadMessage):
        wire.decode_entries(payload, wire.CONTENT_TYPE, {"task": wire.TASK_NAME})


@FAST
@given(body=JSON_VALUES)
@example(body=[[], {}, {}])
@example(body=[[], {"entry": None}, {}])
@example(body=[[1], {"entry": {}}, {}])
@example(body=[[], {"entry": {"v": 2, "id": "x", "ts": 0, "streams": [], "location": "a", "message": ""}}, {}])
@example(body=[[], {"entry": {"v": 1, "id": "", "ts": 0, "streams": [], "location": "a", "message": ""}}, {}])
@example(body=[[], {"entry": {"v": 1, "id": "x", "ts": 1e300, "streams": [], "location": "a", "message": ""}}, {}])
@example(body=[[], {"entry": {"v": 1, "id": "x", "ts": 0, "streams": [], "location": "a", "message": 5}}, {}])
def test_a_body_that_is_not_one_entry_is_refused(body: Any) -> None:
    """JSON bodies that are not `[[], {"entry": <entry>}, embed]` (another wire version, a bad field) are refused."""
    raw = json.dumps(body).encode()
    with pytest.raises(wire.BadMessage):
        wire.decode(_stored(raw))
    with pytest.raises(wire.BadMessage):
        wire.decode_body(raw, wire.CONTENT_TYPE, {"task": wire.TASK_NAME})
    with pytest.raises(wire.BadMessage):
        wire.decode_entries(raw, wire.CONTENT_TYPE, {"task": wire.TASK_NAME})


@FAST
@given(entry=entries(), data=st.data())
def test_a_damaged_message_is_refused_or_read_never_a_crash(entry: Entry, data: st.DataObject) -> None:
    """A stored message with bytes changed, cut or inserted decodes to an entry or raises BadMessage: nothing else."""
    raw = bytearray(wire.encode(entry))
    at = data.draw(st.integers(0, 1 << 20), label="at") % len(raw)
    how = data.draw(st.sampled_from(["change", "cut", "insert"]), label="how")
    if how == "change":
        raw[at] = (raw[at] + data.draw(st.integers(1, 255), label="by")) % 256
    elif how == "cut":
        del raw[at:]
    else:
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
    try:
        decoded = wire.decode(bytes(raw))
    except wire.BadMessage:
        return
    assert isinstance(decoded, Entry)


@FAST
@given(value=JSON_VALUES)
def test_from_wire_says_value_error(value: Any) -> None:
    """`Entry.from_wire` of plain JSON data that is not an entry raises ValueError saying so."""
    with pytest.raises(ValueError, match="not an apilog entry"):
        Entry.from_wire(value)


@pytest.mark.parametrize("decoder", ["decode", "decode_body", "decode_entries"])
def test_a_deeply_nested_message_is_refused(decoder: str) -> None:
    """A forged message whose entry nests a thousand levels deep is a BadMessage like any other bad message."""
    depth = 1000  # delay() itself cuts a message at 64 levels ("[too deep]"): only a forged message is this deep
    entry = '{"v":1,"id":"x","ts":1.0,"streams":["INFO"],"location":"a","message":' + '{"a":' * depth + "1" + "}" * depth
    body = ('[[],{"entry":' + entry + '}},{}]').encode()
    with pytest.raises(wire.BadMessage):
        if decoder == "decode":
            wire.decode(_stored(body))
        elif decoder == "decode_body":
            wire.decode_body(body, wire.CONTENT_TYPE, {"task": wire.TASK_NAME})
        else:
            wire.decode_entries(body, wire.CONTENT_TYPE, {"task": wire.TASK_NAME})
