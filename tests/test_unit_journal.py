"""The journal record (daemon/state/journal.py) as properties: batches round-trip; a torn or flipped record is never whole."""

from __future__ import annotations

import contextlib
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apilogd.exceptions import StateDamaged
from apilogd.state.journal import HEADER, JOURNAL_NAME, MAGIC, Batch, Journal, scan, torn_header
from apilogd.state.ledger import DAMAGED, REPAIR_HINT
from hypothesis import given, settings
from hypothesis import strategies as st

from apilog.core.folder import Folder

FAST = settings(max_examples=80, deadline=None)
ON_DISK = settings(max_examples=50, deadline=None)  # each example opens a journal more than once

# ---------------------------------------------------------------- what a batch may hold

# A file name: any text but '/' and NUL, or bytes that are not UTF-8 (as the file system hands them over).
_TEXT_NAME = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/\0"), min_size=1, max_size=12)
_BYTES_NAME = st.binary(min_size=1, max_size=12).map(lambda b: os.fsdecode(b.replace(b"/", b"_").replace(b"\0", b"_")))
NAMES = st.one_of(_TEXT_NAME, _BYTES_NAME).map(lambda n: n + "_" if n in (".", "..") else n)
RELPATHS = st.builds(lambda top, parts: "/".join([top, *parts]),
                     st.sampled_from(["system", "users", "archive", "seals"]), st.lists(NAMES, min_size=1, max_size=2))
# Entry ids are whatever a producer named its task: any text, or bytes that are not UTF-8 (lone surrogates, as Python
# decodes them; a high surrogate then a low one would be read back as the one character they pair into).
IDS = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=64) | st.binary(min_size=1, max_size=16).map(
    os.fsdecode)
SIZES = st.integers(0, 2**62)
NOTED = st.dictionaries(st.builds("{}:{}".format, st.integers(0, 99999), st.integers(0, 10**20 - 1)), st.integers(0, 2**63 - 1),
                        max_size=2)  # "slot:key"


@st.composite
def batches(draw: st.DrawFn) -> dict[str, Any]:
    """The arguments of one `Journal.append`, with each file's bytes kept apart in `chunks`."""
    shares = draw(st.lists(st.tuples(RELPATHS, SIZES, st.binary(max_size=32)), max_size=3))
    return {
        "files": [(relpath, before, len(chunk)) for relpath, before, chunk in shares],
        "data": b"".join(chunk for _, _, chunk in shares),
        "chunks": [chunk for _, _, chunk in shares],
        "advance": draw(st.dictionaries(NAMES, SIZES, max_size=3)),
        "ids": draw(st.lists(IDS, max_size=3)),
        "renames": draw(st.lists(st.tuples(RELPATHS, RELPATHS), max_size=1)),
        "switches": draw(st.lists(st.tuples(RELPATHS, SIZES), max_size=1)),
        "removes": draw(st.lists(RELPATHS, max_size=1)),
        "noted": draw(NOTED),
    }


@contextlib.contextmanager
def state_folder() -> Iterator[Folder]:
    """A fresh state folder, opened by descriptor as the daemon opens its own (one per Hypothesis example)."""
    with tempfile.TemporaryDirectory() as tmp, Folder.at(Path(tmp) / "state", create_mode=0o750) as state:
        yield state


def append(journal: Journal, batch: dict[str, Any]) -> Batch:
    return journal.append(batch["files"], batch["data"], batch["advance"], batch["ids"], renames=batch["renames"],
                          switches=batch["switches"], removes=batch["removes"], noted=batch["noted"])


def written(drawn: list[dict[str, Any]]) -> tuple[bytes, list[Batch], list[int]]:
    """The journal's bytes after appending `drawn`, the batches it returned, and where each record starts."""
    with state_folder() as state:
        journal = Journal(state, durable=False, checkpoint=0)
        made, starts = [], []
        for batch in drawn:
            starts.append(journal.size)
            made.append(append(journal, batch))
        journal.close()
        return state.read(JOURNAL_NAME), made, starts


def record_of(batch: dict[str, Any]) -> bytes:
    """One batch's record alone."""
    raw, _, _ = written([batch])
    return raw


# ---------------------------------------------------------------- round trip


@FAST
@given(st.lists(batches(), min_size=1, max_size=3), st.data())
def test_batches_read_back_as_appended(drawn: list[dict[str, Any]], data: st.DataObject) -> None:
    """Any batches appended come back whole, in order, with their data; a reopened journal redoes those after its checkpoint."""
    with state_folder() as state:
        journal = Journal(state, durable=False, checkpoint=0)
        made = [append(journal, batch) for batch in drawn]
        journal.close()
        assert [b.seq for b in made] == list(range(1, len(drawn) + 1))
        for batch, original in zip(made, drawn, strict=True):
            assert (batch.files, batch.advance, batch.ids) == (original["files"], original["advance"], original["ids"])
            assert (batch.renames, batch.switches, batch.removes) == (original["renames"], original["switches"],
                                                                      original["removes"])
            assert batch.noted == original["noted"]

        raw = state.read(JOURNAL_NAME)
        records, end, problem = scan(raw)
        assert (end, problem) == (len(raw), None)
        assert records == [(batch, original["data"]) for batch, original in zip(made, drawn, strict=True)]
        for (batch, body), original in zip(records, drawn, strict=True):
            shares = list(batch.shares(body))
            assert [chunk for _, _, chunk in shares] == original["chunks"]
            assert [(relpath, before) for relpath, before, _ in shares] == [(r, b) for r, b, _ in original["files"]]

        checkpoint = data.draw(st.integers(0, len(drawn)), label="checkpoint")
        reopened = Journal(state, durable=False, checkpoint=checkpoint)
        try:
            assert reopened.to_redo == records[checkpoint:]
            assert reopened.seq == len(drawn) and reopened.torn is None and reopened.size == len(raw)
            assert append(reopened, drawn[0]).seq == len(drawn) + 1  # numbering goes on after the last record
        finally:
            reopened.close()


@FAST
@given(batches())
def test_a_record_is_header_and_data_under_one_checksum(batch: dict[str, Any]) -> None:
    """The record's layout: magic, header length, data length, CRC-32 of header then data; the data last, as given."""
    raw = record_of(batch)
    magic, head_len, data_len, crc = HEADER.unpack_from(raw)
    assert magic == MAGIC and data_len == len(batch["data"])
    assert len(raw) == HEADER.size + head_len + data_len
    assert raw.endswith(batch["data"])
    assert zlib.crc32(raw[HEADER.size:]) == crc


# ---------------------------------------------------------------- torn records


@FAST
@given(st.lists(batches(), max_size=2), batches())
def test_a_record_cut_at_any_byte_is_torn_never_whole(before: list[dict[str, Any]], last: dict[str, Any]) -> None:
    """Cut anywhere, the last record is a torn tail: the records before it are read, it is not, and that is no damage."""
    full, made, starts = written([*before, last])
    whole, record = full[:starts[-1]], full[starts[-1]:]
    head_len = HEADER.unpack_from(record)[1]
    for cut in range(1, len(record)):
        raw = whole + record[:cut]
        records, end, problem = scan(raw)
        assert [b for b, _ in records] == made[:-1], f"cut at byte {cut}"
        assert (end, problem) == (len(whole), None), f"cut at byte {cut}"
        # Its header, when whole, is a witness of what it was (never a record: its checksum cannot be checked).
        assert torn_header(raw, end) == (made[-1] if cut >= HEADER.size + head_len else None), f"cut at byte {cut}"


@ON_DISK
@given(st.lists(batches(), max_size=2), batches(), st.data())
def test_a_reopened_journal_never_redoes_a_torn_record(before: list[dict[str, Any]], last: dict[str, Any],
                                                       data: st.DataObject) -> None:
    """Reopened over a torn tail, the journal redoes the whole records only; the tail is cut, at once or by `cut_torn`."""
    full, made, starts = written([*before, last])
    whole, made = full[:starts[-1]], made[:-1]
    cut = data.draw(st.integers(len(whole) + 1, len(full) - 1), label="cut")
    with state_folder() as state:
        state.write_atomic(JOURNAL_NAME, full[:cut], durable=False)
        journal = Journal(state, durable=False, checkpoint=0)
        try:
            assert [b for b, _ in journal.to_redo] == made and journal.seq == len(made)
            if journal.torn is None:
                assert state.read(JOURNAL_NAME) == whole
            else:
                assert state.read(JOURNAL_NAME) == full[:cut]  # kept until the writer saw its files untouched
                journal.cut_torn()
                assert state.read(JOURNAL_NAME) == whole
            assert append(journal, last).seq == len(made) + 1
            assert scan(state.read(JOURNAL_NAME))[1:] == (len(full), None)
        finally:
            journal.close()


@FAST
@given(batches(), batches(), st.data())
def test_a_torn_record_with_a_whole_one_after_it_is_damage(torn: dict[str, Any], after: dict[str, Any],
                                                           data: st.DataObject) -> None:
    """A crash only tears the last record: one torn in the middle means the journal was damaged, and is said so."""
    both, _, starts = written([torn, after])
    record = both[:starts[1]]
    cut = data.draw(st.integers(1, len(record) - 1), label="cut")
    raw = record[:cut] + both[starts[1]:]
    records, end, problem = scan(raw)
    assert (records, end) == ([], 0)
    assert problem is not None


# ---------------------------------------------------------------- flipped bits


def _flipped(raw: bytes, bit: int) -> bytes:
    changed = bytearray(raw)
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


def _check_flip(raw: bytes, starts: list[int], made: list[Batch], index: int, bit: int) -> None:
    """A bit flipped in record `index`: neither it nor anything after it is read; damage unless it was the last."""
    at = starts[index] * 8 + bit
    records, end, problem = scan(_flipped(raw, at))
    assert [b for b, _ in records] == made[:index], f"record {index + 1}, bit {bit}"
    assert end == starts[index], f"record {index + 1}, bit {bit}"
    if index < len(made) - 1:
        assert problem is not None, f"record {index + 1}, bit {bit}"
    # The last record flipped is a torn tail (a crash may leave a file's last blocks unwritten): not damage.


@FAST
@given(st.lists(batches(), min_size=1, max_size=3), st.data())
def test_a_flipped_bit_in_any_record_is_detected(drawn: list[dict[str, Any]], data: st.DataObject) -> None:
    """Any single bit flipped in a record is caught (CRC-32 covers header and data; the frame is checked as well)."""
    raw, made, starts = written(drawn)
    index = data.draw(st.integers(0, len(drawn) - 1), label="record")
    size = (starts[index + 1] if index + 1 < len(starts) else len(raw)) - starts[index]
    _check_flip(raw, starts, made, index, data.draw(st.integers(0, size * 8 - 1), label="bit"))


def test_every_bit_of_a_middle_record_is_covered() -> None:
    """Exhaustively: each of the bits of a record followed by another, flipped alone, makes the journal damaged."""
    batch = {"files": [("users/ann/INFO.log", 120, 7), ("system/INTERNAL.log", 0, 3)], "data": b"INFO: x" + b"yes",
             "chunks": [], "advance": {"1-a.00000001.seg": 4096}, "ids": ["id-1"], "renames": [],
             "switches": [("archive/users/ann/INFO.20250101T000000Z.log", 99)], "removes": [], "noted": {"1:2": 3}}
    raw, made, starts = written([batch, batch, batch])
    for bit in range((starts[2] - starts[1]) * 8):
        _check_flip(raw, starts, made, 1, bit)


@FAST
@given(st.lists(batches(), min_size=2, max_size=3), st.permutations(range(3)))
def test_records_out_of_order_are_damage(drawn: list[dict[str, Any]], order: list[int]) -> None:
    """Records moved around (each is whole and sound) are refused: their numbers must rise."""
    raw, _, starts = written(drawn)
    order = [i for i in order if i < len(drawn)]
    if order == sorted(order):
        order = order[::-1]
    bounds = [*starts, len(raw)]
    shuffled = b"".join(raw[bounds[i]:bounds[i + 1]] for i in order)
    records, _, problem = scan(shuffled)
    assert problem is not None
    assert len(records) < len(drawn)


@given(st.lists(batches(), min_size=3, max_size=6), st.data())
@settings(max_examples=50, deadline=None)
def test_a_record_removed_from_the_middle_is_damage(drawn: list[dict[str, Any]], data: st.DataObject) -> None:
    """Every record whole and sound, but one cut out between two others: the gap in their numbers is damage."""
    raw, _, starts = written(drawn)
    gone = data.draw(st.integers(1, len(drawn) - 2))
    bounds = [*starts, len(raw)]
    records, _, problem = scan(raw[:bounds[gone]] + raw[bounds[gone + 1]:])
    assert problem is not None and len(records) == gone


# ---------------------------------------------------------------- a damaged journal at start


@ON_DISK
@given(st.lists(batches(), min_size=2, max_size=2), st.data())
def test_a_damaged_journal_is_set_aside_and_refused(drawn: list[dict[str, Any]], data: st.DataObject) -> None:
    """Opening a damaged journal raises StateDamaged naming it and the way out; its bytes are kept aside, and it stays refused."""
    raw, _, starts = written(drawn)
    bit = data.draw(st.integers(0, (starts[1] - starts[0]) * 8 - 1), label="bit")  # in the first record of several
    damaged = _flipped(raw, bit)
    with state_folder() as state:
        state.write_atomic(JOURNAL_NAME, damaged, durable=False)
        with pytest.raises(StateDamaged) as caught:
            Journal(state, durable=False, checkpoint=0)
        assert str(state.path / JOURNAL_NAME) in str(caught.value) and REPAIR_HINT in str(caught.value)
        assert not state.exists(JOURNAL_NAME)
        assert state.read(f"{JOURNAL_NAME}.{DAMAGED}") == damaged
        with pytest.raises(StateDamaged, match="not repaired yet"):
            Journal(state, durable=False, checkpoint=0)


def test_a_sound_checksum_over_nonsense_is_damage() -> None:
    """A record whose checksum holds but whose header says what apilogd never writes (a hand edit) is damage too."""
    for head in (b'{"seq":0,"files":[],"advance":{},"ids":[]}',  # record number 0
                 b'{"seq":1,"files":[["/etc/passwd",0,0]],"advance":{},"ids":[]}',  # outside the log tree
                 b'{"seq":1,"files":[["users/a/INFO.log",0,5]],"advance":{},"ids":[]}',  # shares past the data
                 b'{"seq":1,"files":[],"advance":{"a/b":1},"ids":[]}',  # not a segment name
                 b'{"seq":1,"files":[],"advance":{"s":-1},"ids":[]}',
                 b'{"seq":1,"files":[],"advance":{},"ids":[""]}',
                 b'{"seq":1,"files":[],"advance":{},"ids":[],"removes":["users/.."]}',
                 b'{"seq":1,"files":[],"advance":{},"ids":[],"noted":{"x":1}}'):
        raw = HEADER.pack(MAGIC, len(head), 0, zlib.crc32(head)) + head
        records, end, problem = scan(raw)
        assert (records, end) == ([], 0), head
        assert problem is not None and problem.startswith("a record with"), (head, problem)
