"""docs/operations.md, "Durability": each crash state a power cut may leave drains exactly once, verified (tests/powerloss.py)."""

from __future__ import annotations

import collections
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from apilog import settings

from . import powerloss as pl

SAMPLE = 2  # crash states per workload in the default suite
STRESS_STATES = 2000  # distinct crash states at least, over every workload
STRESS_CUTS = {"busy": 250}  # cut points at most (spread over the run): its every cut gives ~3,800 states alone
WORKERS = 3  # apilogd runs at once (each mostly waits: on its start, its drain, its stop)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pl.Recording]:
    base = tmp_path_factory.mktemp("powerloss")
    return {name: make(base) for name, make in pl.WORKLOADS.items()}


def _distinct(rec: pl.Recording, cuts: list[int]) -> list[pl.CrashState]:
    seen: dict[str, pl.CrashState] = {}
    for state in pl.crash_states(rec, cuts):
        seen.setdefault(state.digest, state)
    return list(seen.values())


def _run(rec: pl.Recording, states: list[pl.CrashState], where: Path) -> list[pl.Outcome]:
    def one(numbered: tuple[int, pl.CrashState]) -> pl.Outcome:
        folder = where / f"{rec.name}-{numbered[0]}"
        folder.mkdir(parents=True)
        return pl.check_state(rec, numbered[1], folder)

    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(one, enumerate(states)))


@pytest.mark.parametrize("workload", list(pl.WORKLOADS))
def test_replay_rebuilds_the_final_tree(recordings: dict[str, pl.Recording], workload: str) -> None:
    """The replayer proves itself: the run's operations, replayed on the tree before it, give its final tree byte for byte."""
    rec = recordings[workload]
    assert rec.ops and rec.final_matches() == []


@pytest.mark.parametrize("workload", list(pl.WORKLOADS))
def test_a_sample_of_crash_states(recordings: dict[str, pl.Recording], workload: str, tmp_path: Path) -> None:
    """A few crash states of each workload (the full run is the stress test below): nothing lost, doubled, torn or refused."""
    rec = recordings[workload]
    states = _distinct(rec, pl.cut_points(rec, limit=40))
    sample = random.Random(workload).sample(states, SAMPLE)
    failed = [str(o) for o in _run(rec, sample, tmp_path) if not o.ok]
    assert not failed, "\n".join(failed)


def _cut_before(rec: pl.Recording, kind: str, path: str, nth: int = 0) -> int:
    """How many operations were done just before the `nth` operation `kind` on `path`."""
    return [j for j, op in enumerate(rec.ops) if op.kind == kind and op.path == path][nth]


def test_a_key_saved_before_its_first_seal_line(recordings: dict[str, pl.Recording], tmp_path: Path) -> None:
    """Bug: the first start saved state/seal.key and seal.verify, then crashed before the chain's first line was
    committed. The next start continued the chain at line 1 without it, and verify said every file was tampered.
    Now a key with no seal line makes that line (the genesis) at the next start."""
    rec = recordings["first"]
    cut = _cut_before(rec, "write", "state/journal")  # both key files are saved and synced; nothing is sealed
    state = next(pl.crash_states(rec, [cut], modes=("drop",), undos=(0,)))
    assert "state/seal.key" in state.tree and not any(p.startswith("logs/seals/") for p in state.tree)
    outcome = pl.check_state(rec, state, tmp_path)
    assert outcome.ok, str(outcome)


def _new_user_batch(conf: settings.Settings, producers: pl.Producers, recorder: pl.Recorder) -> None:
    with pl.drainer(conf) as writer:
        producers.log(1, synced=False)  # APILOG_FSYNC=batch: the power cut may take it
        writer.source.look_for_input()
        writer.step()


def test_a_file_measured_before_its_batch_is_committed(tmp_path: Path) -> None:
    """Bug: a batch measured a new target file by creating it, before its journal record was durable. A power cut
    then (taking the producer's unsynced entry with it) left an empty file no seal line names, never written again:
    verify said "never sealed by apilogd". Now a missing file measures 0 and is created when the batch is applied."""
    rec = pl.record("new-user", tmp_path, {"APILOG_FSYNC": "batch"}, "f", lambda conf, producers: None, _new_user_batch)
    cut = _cut_before(rec, "write", "state/journal")
    state = next(pl.crash_states(rec, [cut], modes=("drop",), undos=(0,)))
    assert state.acked == set()
    outcome = pl.check_state(rec, state, tmp_path / "check")
    assert outcome.ok, str(outcome)


def test_a_segment_removed_before_the_ledger_forgets_it(recordings: dict[str, pl.Recording], tmp_path: Path) -> None:
    """Bug (found by this harness): a drained segment was removed, its folder never synced, then a checkpoint saved
    the ledger without it. A power cut brought the segment back, which the ledger no longer named: read again from
    its start, every entry twice (the checkpoint's syncfs reaches the log file system only, the spool may be on
    another). Now the checkpoint syncs the segments folder before it saves such a ledger."""
    rec = recordings["backlog"]
    states = _distinct(rec, [len(rec.ops)])  # the run over; the changes still pending undone, the last ones first
    assert len(states) > 1
    failed = [str(o) for o in _run(rec, states, tmp_path) if not o.ok]
    assert not failed, "\n".join(failed)


def test_folders_made_at_the_first_start(recordings: dict[str, pl.Recording], tmp_path: Path) -> None:
    """Bug (found by this harness): the first start made the state folder, the log folder and the spool's folders
    and synced none of their parents. A power cut could take a whole folder away (the state with its key, ledger
    and journal; the log tree) while the drained segment's removal stayed: its entries lost, or sealed by a key that
    is gone. Now a folder apilogd (or a producer) makes is durable before anything is made in it."""
    rec = recordings["first"]
    states = _distinct(rec, [len(rec.ops)])
    failed = [str(o) for o in _run(rec, states, tmp_path) if not o.ok]
    assert not failed, "\n".join(failed)


@pytest.mark.stress
def test_every_crash_state(recordings: dict[str, pl.Recording], tmp_path: Path) -> None:
    """At least 2,000 distinct crash states over the workloads, each started, drained and checked by a real apilogd."""
    began = time.monotonic()
    plan = {name: _distinct(rec, pl.cut_points(rec, STRESS_CUTS.get(name))) for name, rec in recordings.items()}
    total = sum(map(len, plan.values()))
    assert total >= STRESS_STATES, {name: len(states) for name, states in plan.items()}
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    failed: list[Any] = []
    for name, states in plan.items():
        outcomes = _run(recordings[name], states, tmp_path)
        counts.update((name, state.kind) for state in states)
        failed += [str(o) for o in outcomes if not o.ok]
    print(f"\n{total} distinct crash states in {time.monotonic() - began:.0f} s; failed: {len(failed)}")
    for name, rec in recordings.items():
        print(f"  {name:10} {len(rec.ops)} operations, {len(plan[name])} states")
    for (name, kind), count in sorted(counts.items()):
        print(f"  {name:10} {kind:22} {count}")
    assert not failed, "\n".join(failed[:20])
