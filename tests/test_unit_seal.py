"""The seal chain (apilog/core/seal.py, written by daemon/commit/sealer.py) as properties: it verifies, and any edit breaks it."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from apilogd.commit.open_files import OpenFiles
from apilogd.commit.sealer import KEY_NAME, VERIFY_NAME, Sealer, take_verification_key
from hypothesis import given, settings
from hypothesis import strategies as st

from apilog import _verify
from apilog.core import seal
from apilog.core.folder import Folder
from apilog.core.tree import LogTree

FAST = settings(max_examples=100, deadline=None)
ON_DISK = settings(max_examples=50, deadline=None)  # each example makes a state folder, a log tree and a new chain
EPOCH = 900  # seconds; epochs are ended by hand here, never by the clock

PATHS = ["system/INFO.log", "users/ann/INFO.log", "users/ann/LOGIN.log", "users/b%20c/SECURITY_ALERT.log"]
# One batch: the bytes it appends to some files, and whether its line ends the epoch.
BATCHES = st.lists(st.tuples(st.dictionaries(st.sampled_from(PATHS), st.binary(min_size=1, max_size=40), max_size=3),
                             st.booleans()), min_size=1, max_size=6)


@dataclass
class Sealed:
    """A log tree and its seal log, as apilogd's sealer left them."""

    root: Path
    state: Path
    key: seal.VerificationKey
    keys: list[bytes]  # each epoch's key, as the sealer held it
    position: tuple[int, str]  # line number and digest of the last line, as the ledger would save them
    epoch: int

    @property
    def log(self) -> Path:
        return self.root / seal.SEALS / seal.segment_name(1)

    def lines(self) -> list[bytes]:
        return self.log.read_bytes().splitlines(keepends=True)

    def rewrite(self, lines: list[bytes]) -> None:
        self.log.write_bytes(b"".join(lines))

    def read(self) -> _verify.Seals:
        """The seal log read and checked against the verification key, at a time after every epoch it names."""
        return _verify.read_seals(LogTree(self.root), self.key, now=self.key.t0 + EPOCH * (self.epoch + 2))


@contextmanager
def sealed(batches: list[tuple[dict[str, bytes], bool]]) -> Iterator[Sealed]:
    """Each batch appended to its files and sealed as the batch writer does: `make`, the line appended, `committed`."""
    with tempfile.TemporaryDirectory() as tmp, Folder.at(Path(tmp) / "state", create_mode=0o750) as state:
        tree = LogTree(Path(tmp) / "logs")
        files = OpenFiles(tree)
        try:
            sealer = Sealer(state, tree, files, EPOCH, durable=False, saved=None)
            keys = [sealer.key]
            for shares, ends in batches:
                targets = [(relpath, files.size(relpath), data) for relpath, data in shares.items()]
                end = sealer.epoch + 1 if ends else None
                line = sealer.make(targets, end=end)
                for relpath, _, data in targets:
                    files.append(relpath, data)
                files.append(line[0], line[2])
                sealer.committed(line, end)
                if ends:
                    keys.append(sealer.key)
            text = state.read(VERIFY_NAME).decode()  # as `apilogd seal-key` hands it over (without the fsync of its removal)
            yield Sealed(Path(tmp) / "logs", state.path, seal.VerificationKey.parse(text), keys, sealer.position,
                         sealer.epoch)
        finally:
            files.close()
            tree.close()


# ---------------------------------------------------------------- a chain verifies


@ON_DISK
@given(batches=BATCHES)
def test_a_chain_of_lines_verifies(batches: list[tuple[dict[str, bytes], bool]]) -> None:
    """The lines the sealer writes form one chain, each tag holding under its epoch's key, ending where the sealer stands."""
    with sealed(batches) as chain:
        found = chain.read()
        assert found.problems == []
        assert found.lines == len(batches) == chain.position[0]
        assert found.last_digest == chain.position[1] and found.id == chain.key.id
        assert _verify.read_seals(LogTree(chain.root), None).problems == []  # the chain holds without the key too
        bodies = [seal.split(line)[0] for line in chain.lines()]
        assert [b.e for b in bodies] == [sum(ends for _, ends in batches[:n]) for n in range(len(batches))]
        assert [b.n for b in bodies] == list(range(1, len(batches) + 1))


@ON_DISK
@given(batches=BATCHES.filter(lambda b: sum(ends for _, ends in b) <= 1))
def test_the_files_a_chain_seals_verify(batches: list[tuple[dict[str, bytes], bool]]) -> None:
    """`apilog verify`'s whole check (seal log, then every file against it) passes on what was sealed, and no more."""
    with sealed(batches) as chain:
        report = _verify.Verification(chain.root, chain.key).run()
        assert [str(p) for p in report.problems] == []
        assert report.lines == len(batches)
        written = {relpath for shares, _ in batches for relpath in shares}
        assert report.files == len(written)
        if written:
            victim = min(written)
            with (chain.root / victim).open("ab") as handle:
                handle.write(b"INFO:  added outside apilogd\n")
            tree = LogTree(chain.root)
            problem = _verify.check_file(tree, victim, _verify.read_seals(tree, chain.key).files.get(victim))
            assert problem is not None and "added outside apilogd" in str(problem)


# ---------------------------------------------------------------- any edit breaks it


@ON_DISK
@given(batches=BATCHES, data=st.data())
def test_changing_any_byte_of_any_line_breaks_the_chain(batches: list[tuple[dict[str, bytes], bool]],
                                                        data: st.DataObject) -> None:
    """One byte of one line changed to any other value (body, tag, separator or end of line): the check fails."""
    with sealed(batches) as chain:
        lines = chain.lines()
        index = data.draw(st.integers(0, len(lines) - 1), label="line")
        at = data.draw(st.integers(0, 1 << 16), label="byte") % len(lines[index])  # lines differ in length run to run
        changed = bytearray(lines[index])
        changed[at] = (changed[at] + data.draw(st.integers(1, 255), label="by")) % 256
        chain.rewrite([*lines[:index], bytes(changed), *lines[index + 1:]])
        assert chain.read().problems != []


@ON_DISK
@given(batches=BATCHES.filter(lambda b: len(b) >= 2), data=st.data())
def test_removing_a_line_breaks_the_chain(batches: list[tuple[dict[str, bytes], bool]], data: st.DataObject) -> None:
    """A line removed is found: in the middle by the chain itself, at the end by the position apilogd saved in its ledger."""
    with sealed(batches) as chain:
        lines = chain.lines()
        index = data.draw(st.integers(0, len(lines) - 1), label="line")
        chain.rewrite(lines[:index] + lines[index + 1:])
        found = chain.read()
        if index < len(lines) - 1:
            assert found.problems != []
            return
        # The last line: the chain that is left is whole, but shorter than the one the ledger knows of.
        assert found.problems == [] and (found.lines, found.last_digest) != chain.position
        (chain.state / "ledger.json").write_text(json.dumps({"seal": list(chain.position)}))
        with mock.patch.object(_verify, "RETRY_WAIT", 0):  # the files hold the removed line's batch: no use waiting
            problems = [str(p) for p in _verify.Verification(chain.root, chain.key, None, chain.state).run().problems]
        assert any("its last lines were cut" in p for p in problems), problems


@ON_DISK
@given(batches=BATCHES.filter(lambda b: len(b) >= 2), data=st.data())
def test_reordering_lines_breaks_the_chain(batches: list[tuple[dict[str, bytes], bool]], data: st.DataObject) -> None:
    """Any two lines swapped: the check fails (each line names its number and the digest of the one before)."""
    with sealed(batches) as chain:
        lines = chain.lines()
        first = data.draw(st.integers(0, len(lines) - 2), label="first")
        second = data.draw(st.integers(first + 1, len(lines) - 1), label="second")
        lines[first], lines[second] = lines[second], lines[first]
        chain.rewrite(lines)
        assert chain.read().problems != []


# ---------------------------------------------------------------- epoch keys go one way


@FAST
@given(key=st.binary(min_size=32, max_size=32), steps=st.integers(0, 20), more=st.integers(0, 20))
def test_epoch_keys_evolve_one_way(key: bytes, steps: int, more: int) -> None:
    """K(e+1) = HMAC-SHA256(K(e), "apilog seal epoch"): steps compose, and no key of a later epoch repeats an earlier one."""
    assert seal.evolve(key, 0) == key
    assert seal.evolve(key) == hmac.new(key, b"apilog seal epoch", hashlib.sha256).digest()
    assert seal.evolve(seal.evolve(key, steps), more) == seal.evolve(key, steps + more)
    chain = [seal.evolve(key, n) for n in range(steps + more + 2)]
    assert len(set(chain)) == len(chain)


@ON_DISK
@given(batches=BATCHES.filter(lambda b: any(ends for _, ends in b)))
def test_the_daemon_keeps_only_the_current_key(batches: list[tuple[dict[str, bytes], bool]]) -> None:
    """After an epoch's last line the key on disk is the next epoch's, derived from the last; no earlier key is left."""
    with sealed(batches) as chain:
        assert chain.keys == [seal.evolve(chain.key.key, e) for e in range(chain.epoch + 1)]
        saved = json.loads((chain.state / KEY_NAME).read_text())
        assert (saved["epoch"], bytes.fromhex(saved["key"])) == (chain.epoch, chain.keys[-1])
        with Folder.at(chain.state) as state:
            assert take_verification_key(state) == chain.key.text()  # K(0) leaves the machine with `apilogd seal-key`
        left = b"".join(p.read_bytes() for p in chain.state.iterdir() if p.is_file())
        for past in chain.keys[:-1]:
            assert past.hex().encode() not in left and past not in left


@ON_DISK
@given(batches=BATCHES.filter(lambda b: any(ends for _, ends in b[:-1])), data=st.data(), claim=st.booleans())
def test_the_current_key_cannot_rewrite_a_past_epoch(batches: list[tuple[dict[str, bytes], bool]], data: st.DataObject,
                                                     claim: bool) -> None:
    """Whoever takes the key on disk (the current epoch's) and rewrites a line of an earlier epoch, re-chaining and
    re-tagging every line after it, is found: as that epoch's line (its key is gone) or as the current epoch's (the
    epoch had not ended there)."""
    with sealed(batches) as chain:
        lines = chain.lines()
        bodies = [seal.split(line)[0] for line in lines]
        past = [n for n, body in enumerate(bodies) if body.e < chain.epoch]
        index = data.draw(st.sampled_from(past), label="line")
        forged, prev = lines[:index], seal.digest(lines[index - 1]) if index else ""
        for n, body in enumerate(bodies[index:], index):
            if n == index:
                body.t += 1.0  # the edit: any change of what the line says
            if claim:
                body.e = chain.epoch
            if index:
                body.p = prev
            line = seal.line(body, chain.keys[-1])
            forged.append(line)
            prev = seal.digest(line)
        chain.rewrite(forged)
        assert chain.read().problems != []


def test_the_verification_key_is_handed_over_once() -> None:
    """`apilogd seal-key` takes the verification key off the machine: a second take finds nothing."""
    with sealed([({"users/ann/INFO.log": b"INFO:  hi\n"}, False)]) as chain:
        with Folder.at(chain.state) as state:
            assert take_verification_key(state) == chain.key.text()
            assert take_verification_key(state) is None
        assert not os.path.exists(chain.state / VERIFY_NAME)
        assert chain.key.key == chain.keys[0] and seal.key_id(chain.key.key) == chain.key.id
