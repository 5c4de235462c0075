"""The ledger (daemon/state/ledger.py) as properties: what is saved loads back the same; a damaged ledger is refused whole."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from apilogd.exceptions import StateDamaged
from apilogd.state.ledger import DAMAGED, LIVED_NAME, REPAIR_HINT, Ledger, is_relpath, is_segment_name, parse
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apilog.core.folder import Folder
from apilog.spool.backlog import LEDGER_NAME

FAST = settings(max_examples=100, deadline=None)

# What a sound ledger holds: segment names (any bytes but '/' and NUL, as the file system hands them over), sizes, ids.
SEGMENTS = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/\0"), min_size=1, max_size=16),
    st.binary(min_size=1, max_size=16).map(lambda b: os.fsdecode(b.replace(b"/", b"_").replace(b"\0", b"_"))),
).map(lambda n: n + "_" if n in (".", "..") else n)
OFFSETS = st.dictionaries(SEGMENTS, st.integers(0, 2**62), max_size=5)
IDS = st.lists(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=64), max_size=4)
SEALS = st.none() | st.tuples(st.integers(0, 2**40), st.text("0123456789abcdef", max_size=64))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)


@contextmanager
def state_folder() -> Iterator[Folder]:
    """A fresh state folder, opened by descriptor as the daemon opens its own (one per Hypothesis example)."""
    with tempfile.TemporaryDirectory() as tmp, Folder.at(Path(tmp) / "state", create_mode=0o750) as state:
        yield state


# ---------------------------------------------------------------- round trip


@FAST
@given(offsets=OFFSETS, last_ids=IDS, checkpoint=st.integers(0, 2**62), seal=SEALS)
def test_what_is_saved_loads_back(offsets: dict[str, int], last_ids: list[str], checkpoint: int,
                                  seal: tuple[int, str] | None) -> None:
    """Offsets, the last ids, the checkpoint and the seal position saved are what the next start reads."""
    with state_folder() as state:
        first = Ledger(state, durable=False)
        assert (first.offsets, first.pending, first.last_ids, first.checkpoint, first.seal) == ({}, None, [], 0, None)
        assert not first.journaled
        first.offsets, first.last_ids, first.checkpoint, first.seal = dict(offsets), list(last_ids), checkpoint, seal
        first.save()
        again = Ledger(state, durable=False)
        assert (again.offsets, again.last_ids, again.checkpoint, again.seal) == (offsets, last_ids, checkpoint, seal)
        assert again.pending is None and again.journaled  # saved by a version that keeps a journal
        assert not any(name.startswith(f"{LEDGER_NAME}.{DAMAGED}") for name in state.names())


def test_a_first_start_saves_an_empty_ledger() -> None:
    """No ledger yet and no daemon ever ran here: an empty one is made, so that its absence later means it was lost."""
    with state_folder() as state:
        Ledger(state, durable=False)
        assert json.loads(state.read(LEDGER_NAME))["offsets"] == {}
        state.write_atomic(LIVED_NAME, b"", durable=False)  # a daemon ran here (its probe file)
        state.unlink(LEDGER_NAME)
        with pytest.raises(StateDamaged, match="is missing, though apilogd ran here before"):
            Ledger(state, durable=False)


@FAST
@given(start=OFFSETS, moves=st.lists(OFFSETS, max_size=4))
def test_offsets_never_move_back(start: dict[str, int], moves: list[dict[str, int]]) -> None:
    """`advance` keeps the larger offset of each segment: a journal replayed twice, or out of order, changes nothing."""
    with state_folder() as state:
        ledger = Ledger(state, durable=False)
        ledger.offsets = dict(start)
        for positions in moves:
            ledger.advance(positions)
        expected = dict(start)
        for positions in moves:
            for name, offset in positions.items():
                expected[name] = max(expected.get(name, offset), offset)
        assert ledger.offsets == expected
        for positions in [*moves, *reversed(moves)]:
            ledger.advance(positions)
        assert ledger.offsets == expected


def test_a_removed_segment_is_forgotten_at_the_next_save() -> None:
    """`forget` drops a segment's offset; the ledger saved after no longer names it."""
    with state_folder() as state:
        ledger = Ledger(state, durable=False)
        ledger.advance({"1-a.00000001.seg": 40, "2-b.00000001.seg": 7})
        ledger.forget("1-a.00000001.seg")
        ledger.forget("never-there")
        ledger.save()
        assert Ledger(state, durable=False).offsets == {"2-b.00000001.seg": 7}


# ---------------------------------------------------------------- damaged ledgers


def refused(state: Folder, raw: bytes) -> str:
    """Start on a ledger holding `raw`: it must be refused, set aside whole, and stay refused until repaired."""
    state.write_atomic(LEDGER_NAME, raw, durable=False)
    with pytest.raises(StateDamaged) as caught:
        Ledger(state, durable=False)
    message = str(caught.value)
    assert str(state.path / LEDGER_NAME) in message and "is damaged" in message and REPAIR_HINT in message
    assert not state.exists(LEDGER_NAME)
    assert state.read(f"{LEDGER_NAME}.{DAMAGED}") == raw  # kept for `apilogd repair`, byte for byte
    with pytest.raises(StateDamaged, match="not repaired yet"):
        Ledger(state, durable=False)  # starting afresh would write entries twice or skip them
    return message


def _not_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return True
    return False


@FAST
@given(raw=st.binary(max_size=64).filter(_not_json))
@example(raw=b"")
@example(raw=b'{"offsets": {"a": 1}')  # cut short, as a ledger written in place would be by a crash
def test_a_ledger_that_is_not_json_is_refused(raw: bytes) -> None:
    """Bytes that are not JSON (empty, cut, garbage) are refused with StateDamaged."""
    with state_folder() as state:
        refused(state, raw)


@FAST
@given(value=JSON.filter(lambda v: not isinstance(v, dict)))
def test_a_ledger_that_is_not_an_object_is_refused(value: Any) -> None:
    """JSON that is not an object (a list, a number, a string, null) is refused."""
    with state_folder() as state:
        assert "not a JSON object" in refused(state, json.dumps(value).encode())


BAD_SIZES = st.one_of(st.integers(max_value=-1), st.floats(), st.booleans(), st.none(), st.text(max_size=4),
                      st.lists(st.integers(), max_size=2))
BAD_NAMES = st.one_of(st.just(""), st.just("."), st.just(".."), st.just("\ud800"), st.text(min_size=256, max_size=300),
                      st.builds("{}/{}".format, SEGMENTS, SEGMENTS), st.builds("{}\0".format, SEGMENTS))


@FAST
@given(good=OFFSETS, name=SEGMENTS, size=BAD_SIZES)
def test_an_offset_that_is_not_a_size_is_refused(good: dict[str, int], name: str, size: Any) -> None:
    """A negative offset, or one that is not a whole number (a float, true, null, a string), is refused."""
    with state_folder() as state:
        body = {"offsets": {**good, name: size}, "checkpoint": 1}
        assert "not a size" in refused(state, json.dumps(body, allow_nan=True).encode())


@FAST
@given(good=OFFSETS, name=BAD_NAMES, size=st.integers(0, 2**40))
def test_an_offset_of_a_name_no_segment_has_is_refused(good: dict[str, int], name: str, size: int) -> None:
    """Offsets of names no spool segment can have (empty, '.', '..', a '/', a NUL, over 255, a lone surrogate) are refused."""
    assert not is_segment_name(name)
    with state_folder() as state:
        body = {"offsets": {**good, name: size}, "checkpoint": 1}
        assert "not a name apilogd writes" in refused(state, json.dumps(body).encode())



def _sizes(value: Any, names: Any = is_segment_name) -> bool:
    return isinstance(value, dict) and all(names(k) and type(n) is int and n >= 0 for k, n in value.items())


def _ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(i) is str and 0 < len(i) <= 64 for i in value)


def _count(value: Any) -> bool:
    return value is None or (type(value) is int and value >= 0)


def _seal(value: Any) -> bool:
    return value is None or (isinstance(value, list) and len(value) == 2 and type(value[0]) is int and value[0] >= 0
                             and type(value[1]) is str and len(value[1]) <= 64)


def _pending(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and _sizes(value.get("files"), is_relpath)
                             and _sizes(value.get("offsets")))


@FAST
@given(field=st.sampled_from(["offsets", "last_ids", "checkpoint", "seal", "pending"]), value=JSON)
def test_a_field_of_the_wrong_shape_is_refused(field: str, value: Any) -> None:
    """Each field holds only what it may: anything else there is refused, never half believed."""
    sound = {"offsets": _sizes, "last_ids": _ids, "checkpoint": _count, "seal": _seal, "pending": _pending}[field]
    raw = json.dumps({field: value}).encode()
    with state_folder() as state:
        if sound(value):
            state.write_atomic(LEDGER_NAME, raw, durable=False)
            Ledger(state, durable=False)
        else:
            refused(state, raw)


@pytest.mark.parametrize("body", [
    {"checkpoint": -1}, {"checkpoint": True}, {"checkpoint": 1.5}, {"checkpoint": "3"},
    {"last_ids": [""]}, {"last_ids": ["x" * 65]}, {"last_ids": "abc"}, {"last_ids": [1]},
    {"seal": [1]}, {"seal": [-1, "ab"]}, {"seal": ["1", "ab"]}, {"seal": [1, "a" * 65]}, {"seal": {"n": 1}},
    {"pending": []}, {"pending": {"files": {"/etc/passwd": 0}, "offsets": {}}},
    {"pending": {"files": {"users/a/INFO.log": -1}, "offsets": {}}}, {"pending": {"files": {}, "offsets": {"a/b": 1}}},
    {"offsets": []}, {"offsets": None},
])
def test_named_damage_is_refused(body: dict[str, Any]) -> None:
    """Examples of each rule the ledger is held to, named one by one."""
    with state_folder() as state:
        refused(state, json.dumps(body).encode())


def test_a_sound_pending_batch_of_the_version_before_the_journal_is_read() -> None:
    """A ledger of the version before the journal, with a batch in flight, is read (recovery undoes the batch)."""
    body = {"offsets": {"1-a.00000001.seg": 10},
            "pending": {"files": {"users/a/INFO.log": 3}, "offsets": {"1-a.00000001.seg": 20}}}
    with state_folder() as state:
        state.write_atomic(LEDGER_NAME, json.dumps(body).encode(), durable=False)
        ledger = Ledger(state, durable=False)
        assert ledger.pending == body["pending"] and not ledger.journaled and ledger.offsets == {"1-a.00000001.seg": 10}
        ledger.abort()
        assert Ledger(state, durable=False).pending is None


def test_a_ledger_that_is_not_a_plain_file_is_refused() -> None:
    """A folder or a link where the ledger belongs is set aside and refused, never followed."""
    with state_folder() as state:
        os.mkdir(LEDGER_NAME, dir_fd=state.fd)
        with pytest.raises(StateDamaged, match="not a plain file"):
            Ledger(state, durable=False)
    with state_folder() as state:
        os.symlink("/etc/hostname", LEDGER_NAME, dir_fd=state.fd)
        with pytest.raises(StateDamaged, match="not a plain file"):
            Ledger(state, durable=False)
        assert os.readlink(f"{LEDGER_NAME}.{DAMAGED}", dir_fd=state.fd) == "/etc/hostname"


@FAST
@given(raw=st.binary(max_size=80) | JSON.map(lambda v: json.dumps(v).encode()))
def test_parse_says_value_error_or_reads(raw: bytes) -> None:
    """`parse` of any bytes either reads a ledger or raises ValueError saying what is wrong: never another error."""
    try:
        parsed = parse(raw)
    except ValueError as exc:
        assert str(exc)
        return
    assert all(is_segment_name(k) and type(v) is int and v >= 0 for k, v in parsed.offsets.items())
    if parsed.pending is not None:
        assert all(is_relpath(p) for p in parsed.pending["files"])
