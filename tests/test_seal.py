"""docs/sealing.md: sealed logs. A real apilogd seals a tree; each way of tampering with it is caught by `apilog verify`."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from apilogd.process import control

from apilog import logger, settings
from apilog.core import seal

from .utils import Daemon, take_seal_key, wait_for, wait_written

USER_A, USER_B = "usera1@gizzleMail.com", "userb2@gizzleMail.com"
EPOCH = 1  # seconds: several epochs pass while the tree is made


def apilog(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "apilog", *args], capture_output=True, text=True, timeout=120,
                          env=env or dict(os.environ))


def verify(log_dir: Path, key: Path | None, *more: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APILOG_LOG_DIR": str(log_dir)}
    return apilog("verify", *(["--key", str(key)] if key else []), *more, env=env)


def _one_batch_each(texts: list[tuple[str, str, str]]) -> None:
    """Each entry in a batch of its own, so a file holds many seals."""
    for stream, user, text in texts:
        logger.delay(stream, user, text)
        wait_written()


def _archive_and_settle(home: Path) -> None:
    assert apilog("archive").returncode == 0
    archive = home / "logs" / "archive"
    wait_for(lambda: not [p for p in archive.rglob("*") if p.is_file() and not p.name.endswith(".gz")],
             what="compression and its seal")
    time.sleep(0.3)  # the .gz's seal line follows its compression


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A tree a real apilogd sealed over several epochs: live files, two generations of archives, a dict body.

    Yields (the home, the verification key's file); the daemon is stopped.
    """
    home = tmp_path_factory.mktemp("sealed") / "home"
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("APILOG_") or n == "NOTIFY_SOCKET"]:
        del os.environ[name]
    os.environ.update(APILOG_HOME=str(home), APILOG_SEAL_EPOCH=str(EPOCH))
    settings.reset()
    try:
        control.start(settings.load())
        for generation in range(3):
            _one_batch_each([("INFO", USER_A, f"gen {generation} entry {i}") for i in range(6)]
                            + [("LOGIN", USER_B, f"gen {generation} login {i}") for i in range(3)])
            logger.delay("SECURITY ALERT", USER_A, {"ip": "10.0.0.1", "gen": generation}, dict_to_string=True,
                         heading="Odd login")
            wait_written()
            if generation < 2:
                _archive_and_settle(home)
        time.sleep(2.5 * EPOCH)  # the key evolves while idle too
        key = take_seal_key(home.parent / "verification.key")
        control.stop(settings.load())
        yield home, key
    finally:
        control.stop(settings.load())
        os.environ.clear()
        os.environ.update(saved)
        settings.reset()


@pytest.fixture
def tree(sealed: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the sealed log tree to tamper with, and the verification key."""
    home, key = sealed
    copy = tmp_path / "logs"
    shutil.copytree(home / "logs", copy, symlinks=True)
    return copy, key


def _live(tree: Path, user: str, stream: str) -> Path:
    return tree / "users" / user / f"{stream.replace(' ', '_')}.log"


def _archives(tree: Path, user: str, stream: str) -> list[Path]:
    return sorted((tree / "archive" / "users" / user).glob(f"{stream}.*.log.gz"))


def _edit(path: Path, change: Callable[[list[str]], list[str]]) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(change(lines)))


def _edit_archive(path: Path, change: Callable[[list[str]], list[str]]) -> None:
    lines = gzip.decompress(path.read_bytes()).decode().splitlines(keepends=True)
    path.write_bytes(gzip.compress("".join(change(lines)).encode(), mtime=0))


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap.tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _rewrite_plausibly(tree: Path) -> None:
    """The whole file deleted and written again with entries of the right form and stamps."""
    path = _live(tree, USER_B, "LOGIN")
    text = path.read_text()
    path.unlink()
    path.write_text(text.replace("login 1", "login 7"))


def _before_last_write(lines: list[str]) -> list[str]:
    """The seal log without its lines from the last one that sealed appended bytes on (a cut hiding the last entries)."""
    last = max(i for i, text in enumerate(lines) if seal.split(text.encode())[0].w)
    return lines[:last]


def _shadowed_gz(tree: Path) -> None:
    """The sealed content put back as a plain copy, and a forged .gz beside it (what readers show)."""
    packed = _archives(tree, USER_A, "INFO")[0]
    packed.with_suffix("").write_bytes(gzip.decompress(packed.read_bytes()))
    packed.write_bytes(gzip.compress(b"INFO:  forged entry\n"))


def _folder_linked_away(tree: Path) -> None:
    outside = tree.parent / "outside"
    (tree / "users" / USER_B).rename(outside)
    (outside / "ERROR.log").write_text("ERROR:  planted behind a link\n")
    (tree / "users" / USER_B).symlink_to(outside)


def _far_epoch(tree: Path) -> None:
    segment, lines = _lines(tree)
    first = seal.split(lines[0])[0]
    first.e = 10**12
    segment.write_bytes(b"".join([seal.line(first, b"\0" * 32), *lines[1:]]))


def _seal_log_file_is(tree: Path, kind: str) -> None:
    segment = next((tree / "seals").iterdir())
    if kind == "fifo":
        os.mkfifo(segment.with_name("000000999999.seal"))
    elif kind == "zero":
        segment.with_name("000000999999.seal").symlink_to("/dev/zero")
    else:
        shutil.rmtree(tree / "seals")
        (tree / "seals").write_text("not a folder\n")


TAMPERING: dict[str, tuple[Callable[[Path], None], str]] = {
    "a changed byte": (lambda t: _edit(_live(t, USER_A, "INFO"), lambda ls: [ls[0], ls[1].replace("entry", "entrY"), *ls[2:]]),
                       "line 2"),
    "an inserted entry": (lambda t: _edit(_live(t, USER_A, "INFO"), lambda ls: [ls[0], ls[1], ls[1], *ls[2:]]), "line 3"),
    "a removed entry": (lambda t: _edit(_live(t, USER_A, "INFO"), lambda ls: [ls[0], *ls[2:]]), "line 2"),
    "reordered entries": (lambda t: _edit(_live(t, USER_A, "INFO"), lambda ls: [ls[0], ls[2], ls[1], *ls[3:]]), "line 2"),
    "a cut file": (lambda t: _edit(_live(t, USER_A, "INFO"), lambda ls: ls[:3]), "cut"),
    "an appended forgery": (lambda t: _edit(_live(t, USER_A, "INFO"),
                                            lambda ls: [*ls, "INFO:  gen 2 entry 6 \u00a7 [2026-11-29 01:58:10]\n"]),
                            "after the last sealed"),
    "an archive removed": (lambda t: _archives(t, USER_A, "INFO")[0].unlink(), "removed"),
    "an archive recompressed": (lambda t: _archives(t, USER_A, "INFO")[0].write_bytes(
        gzip.compress(gzip.decompress(_archives(t, USER_A, "INFO")[0].read_bytes()), compresslevel=1, mtime=1)),
        "rewritten"),
    "an archive rewritten": (lambda t: _edit_archive(_archives(t, USER_A, "INFO")[1], lambda ls: ls[1:]), "line 1"),
    "archives swapped": (lambda t: _swap(*_archives(t, USER_A, "INFO")), "INFO."),
    "an archive swapped with another user's": (lambda t: _swap(_archives(t, USER_A, "INFO")[0],
                                                               _archives(t, USER_B, "LOGIN")[0]), "differ"),
    "a file deleted and rewritten": (_rewrite_plausibly, "line 2"),
    "a planted file": (lambda t: (t / "users" / "intruder").mkdir() or (t / "users" / "intruder" / "INFO.log")
                       .write_text("INFO:  hello\n"), "never sealed"),
    "a user's folder deleted": (lambda t: shutil.rmtree(t / "users" / USER_B), "removed"),
    "a file swapped for a link": (lambda t: _live(t, USER_A, "INFO").unlink() or _live(t, USER_A, "INFO")
                                  .symlink_to("/etc/passwd"), "cannot be read"),
    "a FIFO in place of a file": (lambda t: _live(t, USER_B, "LOGIN").unlink() or os.mkfifo(_live(t, USER_B, "LOGIN")),
                                  "cannot be read"),
    "a forged .gz beside its sealed plain copy": (_shadowed_gz, "forged entry"),
    "a user's folder swapped for a link": (_folder_linked_away, "is a link"),
    "everything deleted": (lambda t: [shutil.rmtree(t / top, ignore_errors=True)
                                      for top in ("seals", "users", "archive", "system")], "missing"),
    "a first line claiming a far epoch": (_far_epoch, "first line"),
    "a FIFO among the seal log's files": (lambda t: _seal_log_file_is(t, "fifo"), "cannot be read"),
    "a seal log file linked to /dev/zero": (lambda t: _seal_log_file_is(t, "zero"), "cannot be read"),
    "the seals folder a file": (lambda t: _seal_log_file_is(t, "file"), "cannot be read"),
    "a seal line removed": (lambda t: _edit(next((t / "seals").iterdir()), lambda ls: [*ls[:4], *ls[5:]]), "line 5"),
    "the seal log cut short": (lambda t: _edit(next((t / "seals").iterdir()), _before_last_write), "SECURITY_ALERT"),
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_verify_catches_each_way_of_tampering(tree: tuple[Path, Path], how: str) -> None:
    """Exit 1, naming the file (and the first bad entry where there is one); the untouched copy verifies."""
    logs, key = tree
    assert verify(logs, key).returncode == 0
    tamper, said = TAMPERING[how]
    tamper(logs)
    found = verify(logs, key)
    assert found.returncode == 1, f"{how} went unnoticed: {found.stdout}{found.stderr}"
    assert "TAMPERED" in found.stdout and said in found.stdout, found.stdout


def test_an_untouched_tree_verifies_and_the_key_is_handed_out_once(sealed: tuple[Path, Path]) -> None:
    home, key = sealed
    state = home / "state"
    assert (state / "seal.key").stat().st_mode & 0o777 == 0o600  # never the app's group
    assert not (state / "seal.verify").exists()  # handed out, and gone
    again = subprocess.run([sys.executable, "-m", "apilogd", "seal-key"], capture_output=True, text=True,
                           env={**os.environ, "APILOG_HOME": str(home)})
    assert again.returncode == 1 and "printed before" in again.stderr
    found = verify(home / "logs", key)
    assert found.returncode == 0, found.stdout
    assert "intact:" in found.stdout
    assert verify(home / "logs", key, "--user", USER_A).returncode == 0
    keyless = verify(home / "logs", None)
    assert keyless.returncode == 0 and "not checked" in keyless.stderr
    assert verify(home / "logs", key, "--user", "nobody@example.com").returncode == 2
    bad_key = home.parent / "bad.key"
    bad_key.write_text("apilog-seal-1:0000:00:0:1\n")
    assert verify(home / "logs", bad_key).returncode == 2


def _lines(tree: Path) -> tuple[Path, list[bytes]]:
    segment = next((tree / "seals").iterdir())
    return segment, segment.read_bytes().splitlines(keepends=True)


def _reseal(lines: list[bytes], start: int, key_of: Callable[[int], bytes]) -> list[bytes]:
    """Lines from `start` on tagged again and chained anew, each with the key `key_of` gives for its epoch."""
    out = lines[:start]
    for raw_line in lines[start:]:
        body = seal.split(raw_line)[0]
        body.p = seal.digest(out[-1])
        out.append(seal.line(body, key_of(body.e)))
    return out


def test_the_key_on_disk_cannot_seal_a_past_epoch(sealed: tuple[Path, Path], tmp_path: Path) -> None:
    """A past line forged and re-sealed with the key the machine holds now fails; with its epoch's own key it would pass."""
    home, key_file = sealed
    on_disk = json.loads((home / "state" / "seal.key").read_text())
    now_epoch, now_key = on_disk["epoch"], bytes.fromhex(on_disk["key"])
    first = seal.VerificationKey.parse(key_file.read_text())
    logs = tmp_path / "logs"
    shutil.copytree(home / "logs", logs)
    segment, lines = _lines(logs)
    # The forgery: one of user A's INFO entries changed in the live file, and its seal line changed to match.
    live = _live(logs, USER_A, "INFO")
    text = live.read_bytes()
    forged_text = text.replace(b"gen 2 entry 3", b"gen 2 entry X")
    where, relpath = text.index(b"gen 2 entry 3"), f"users/{USER_A}/INFO.log"
    at = max(i for i, raw in enumerate(lines)  # the live file's seal that covers the entry (earlier ones are archives')
             if any(w[0] == relpath and w[1] <= where < w[1] + w[2] for w in seal.split(raw)[0].w))
    body = seal.split(lines[at])[0]
    assert body.e < now_epoch, "the forged line must be of a past epoch"
    body.w = [(path, before, length, seal.digest(forged_text[before:before + length]) if path == relpath
               else digest) for path, before, length, digest in body.w]

    def forge(key_of: Callable[[int], bytes]) -> subprocess.CompletedProcess[str]:
        resealed = _reseal([*lines[:at], seal.line(body, b"\0" * 32), *lines[at + 1:]], at, key_of)
        segment.write_bytes(b"".join(resealed))
        live.write_bytes(forged_text)
        return verify(logs, key_file)

    # The intruder holds only today's key, and whatever can be derived from it (later epochs' keys).
    for derived in (now_key, seal.evolve(now_key), seal.evolve(now_key, 5)):
        found = forge(lambda epoch, k=derived: k)  # type: ignore[misc]
        assert found.returncode == 1 and "does not hold" in found.stdout, found.stdout
    # Control: with each epoch's true key (derived from the verification key) the same forgery passes,
    # so what stops the intruder is the key alone.
    assert forge(lambda epoch: seal.evolve(first.key, epoch)).returncode == 0
    assert seal.evolve(first.key, now_epoch) == now_key  # the key on disk is epoch k's, evolved forward
    assert all(seal.evolve(first.key, e) != now_key for e in range(now_epoch))


def test_sealing_holds_through_sigkills_and_rotation(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """apilogd killed with SIGKILL mid-stream, with rotation on: everything written once and the tree verifies."""
    monkeypatch.setenv("APILOG_ROTATE_BYTES", "4000")
    monkeypatch.setenv("APILOG_SEAL_EPOCH", "1")
    settings.reset()
    written = 0
    for round_ in range(4):
        daemon = Daemon(tmp_path)
        assert daemon.ready()
        for i in range(400):
            logger.delay("INFO", f"kill{i % 4}", f"r{round_} n{i:04d}", timestamp=False)
            written += 1
            if i == 250:
                time.sleep(0.05)
        time.sleep(0.02 * round_)
        daemon.kill()  # SIGKILL, mid-batch or between
    daemon = Daemon(tmp_path)
    assert daemon.ready()
    wait_written()
    assert apilog("archive").returncode == 0
    time.sleep(1.5)
    take_seal_key(tmp_path / "key")
    assert daemon.stop() == 0
    found = verify(home / "logs", tmp_path / "key")
    assert found.returncode == 0, found.stdout + daemon.stderr[-3000:]
    entries = []
    for path in (home / "logs").rglob("*"):
        # A .gz.tmp is a compression a stop cut short (removed at the next start): no reader reads it.
        if path.is_file() and "users" in path.parts and not path.name.endswith(".tmp"):
            data = path.read_bytes()
            entries.extend((gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode().splitlines())
    assert len(entries) == written == len(set(entries))


def test_a_seal_log_cut_while_apilogd_was_stopped_is_sealed_as_such(home: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The seal log's tail cut (with the files' matching tails): verify, reading apilogd's ledger, and apilogd at its
    next start (which seals what it found) both notice."""
    daemon = Daemon(tmp_path)
    assert daemon.ready()
    _one_batch_each([("INFO", USER_A, f"entry {i}") for i in range(5)])
    take_seal_key(tmp_path / "key")
    assert daemon.stop() == 0
    logs = home / "logs"
    segment, lines = _lines(logs)
    kept = lines[:-2]  # the last two batches' lines, and their entries, cut away
    segment.write_bytes(b"".join(kept))
    _edit(_live(logs, USER_A, "INFO"), lambda ls: ls[:3])
    cut = verify(logs, tmp_path / "key")  # the tree agrees with itself; apilogd's ledger says the chain went further
    assert cut.returncode == 1 and "but apilogd sealed up to line" in cut.stdout, cut.stdout
    daemon = Daemon(tmp_path)
    assert daemon.ready()
    logger.delay("INFO", USER_A, "after the cut")
    wait_written()
    assert daemon.stop() == 0
    found = verify(logs, tmp_path / "key")
    assert found.returncode == 1 and "lines removed" in found.stdout, found.stdout


def test_a_seal_line_naming_a_path_outside_the_tree_is_never_followed(tree: tuple[Path, Path]) -> None:
    """Even a line validly sealed (by a holder of the key) that names ../../etc/passwd makes verify read nothing outside."""
    logs, key_file = tree
    first = seal.VerificationKey.parse(key_file.read_text())
    segment, lines = _lines(logs)
    body = seal.split(lines[1])[0]
    body.w = [("users/../../../../etc/passwd", 0, 10, "0" * 64)]
    segment.write_bytes(b"".join(_reseal([lines[0], seal.line(body, b""), *lines[2:]], 1,
                                         lambda epoch: seal.evolve(first.key, epoch))))
    found = verify(logs, key_file)
    assert found.returncode == 1 and "outside the log tree" in found.stdout, found.stdout
    assert "passwd: " not in found.stdout  # reported as a bad line, never checked as a file


def test_the_key_on_disk_cannot_cut_the_end_of_a_past_epoch(sealed: tuple[Path, Path], tmp_path: Path) -> None:
    """With today's key an intruder can add lines from now on (docs/sealing.md says so), but cannot hide that a past
    epoch's last lines are gone: each epoch ends with a line sealed by its own key, naming the next epoch."""
    home, key_file = sealed
    on_disk = json.loads((home / "state" / "seal.key").read_text())
    now_epoch, now_key = on_disk["epoch"], bytes.fromhex(on_disk["key"])
    logs = tmp_path / "logs"
    shutil.copytree(home / "logs", logs)
    segment, lines = _lines(logs)
    assert seal.split(lines[-1])[0].end == now_epoch  # the last line ended the epoch before today's

    def forged_after(kept: list[bytes]) -> subprocess.CompletedProcess[str]:
        last = seal.split(kept[-1])[0]
        forged = seal.Body(n=last.n + 1, e=now_epoch, t=time.time(), p=seal.digest(kept[-1]))
        segment.write_bytes(b"".join([*kept, seal.line(forged, now_key)]))
        return verify(logs, key_file)

    assert forged_after(lines).returncode == 0  # adding from now on: what the current key allows
    cut = forged_after(lines[:-1])  # the past epoch's last line cut, and the chain carried on with today's key
    assert cut.returncode == 1 and "epoch" in cut.stdout, cut.stdout


def test_a_rotation_whose_rename_fails_takes_its_seal_line_back(daemon: Path) -> None:
    """The rename into archive/ refused (the folder made immutable): the file stays live, and the move its
    record had sealed is taken back with the record, so the tree still verifies; the rotation later succeeds."""
    logger.delay("INFO", "kim", "kim one", timestamp=False)
    wait_written()
    folder = daemon / "logs" / "archive" / "users" / "kim"
    folder.mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        refused = apilog("archive")
        assert refused.returncode == 1 and "users/kim/INFO.log" in refused.stderr, refused.stderr
        logger.delay("INFO", "kim", "kim two", timestamp=False)
        wait_written()
        found = verify(daemon / "logs", None)
        assert found.returncode == 0, found.stdout
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert apilog("archive").returncode == 0
    wait_for(lambda: any(folder.glob("INFO.*.log.gz")) and not any(folder.glob("*.log")), what="the archive compressed")
    time.sleep(0.3)
    assert verify(daemon / "logs", None).returncode == 0
    assert gzip.decompress(next(folder.glob("INFO.*.log.gz")).read_bytes()) == b"INFO:  kim one\nINFO:  kim two\n"


def _internal(home: Path) -> str:
    path = home / "logs" / "system" / "INTERNAL.log"
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize("damage", ["bad JSON", "a link", "the seals folder a link", "the seal log a folder",
                                    "a planted last line naming a far epoch"])
def test_a_damaged_key_or_seal_log_never_stops_writing(home: Path, tmp_path: Path, damage: str) -> None:
    """Sealing's own state damaged while apilogd was stopped: it starts, every entry is written, INTERNAL says
    what was found, and verify reports the break instead of passing over it (docs/reference.md, D7)."""
    daemon = Daemon(tmp_path)
    assert daemon.ready()
    _one_batch_each([("INFO", USER_A, f"before {i}") for i in range(3)])
    take_seal_key(tmp_path / "key")
    assert daemon.stop() == 0
    logs, elsewhere = home / "logs", tmp_path / "elsewhere"
    elsewhere.mkdir()
    if damage == "bad JSON":
        (home / "state" / "seal.key").write_text("{not json")
    elif damage == "a link":
        (home / "state" / "seal.key").unlink()
        (home / "state" / "seal.key").symlink_to(elsewhere / "planted.key")
    elif damage == "the seals folder a link":
        (logs / "seals").rename(elsewhere / "seals")
        (logs / "seals").symlink_to(elsewhere / "seals")
    elif damage == "the seal log a folder":
        segment = next((logs / "seals").iterdir())
        segment.unlink()
        segment.mkdir()
    else:  # found: apilogd believed the tail's `end` and spent for ever evolving its key to it
        with next((logs / "seals").iterdir()).open("a") as segment_file:
            segment_file.write('{"n":99,"e":0,"t":0,"end":1000000000000} ' + "0" * 64 + "\n")
    daemon = Daemon(tmp_path)
    assert daemon.ready(), daemon.stderr
    _one_batch_each([("INFO", USER_A, f"after {i}") for i in range(3)])
    assert daemon.stop() == 0
    assert _live(logs, USER_A, "INFO").read_text().count("INFO:  ") == 6
    found = verify(logs, tmp_path / "key")
    assert found.returncode == 1, found.stdout
    reported = _internal(home)
    assert ("seal" in reported and ("damaged" in reported or "could not be opened" in reported or "not one apilogd"
                                    in reported or "set aside" in reported or "ended at line" in reported)), reported
    assert not any(elsewhere.rglob("*.seal")) or damage == "the seals folder a link"
    if damage == "the seals folder a link":  # never written through the link
        assert len(next(elsewhere.joinpath("seals").iterdir()).read_text().splitlines()) < 10


def test_verify_against_a_busy_apilogd_rotating_many_times_a_second_finds_nothing_wrong(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an attack: with files rotated several times a second, verify called an intact tree tampered
    (a live file a batch ahead of the seal log it read, or rotated since). A file is now read again and
    checked against the seal log read after it."""
    monkeypatch.setenv("APILOG_ROTATE_BYTES", "2000")
    settings.reset()
    daemon = Daemon(tmp_path)
    assert daemon.ready()
    producers = [subprocess.Popen([sys.executable, "-c", f"""
import time
from apilog import logger
n, end = 0, time.time() + 10
while time.time() < end:
    for user in ("a@x.com", "b@x.com", "c@x.com"):
        logger.delay("INFO", user, f"busy {p} {{n}}")
    n += 1
    time.sleep(0.001)
"""]) for p in range(3)]
    try:
        time.sleep(1)
        results = []
        for _ in range(6):
            apilog("archive")
            results.append(verify(home / "logs", None))
        assert all(p.wait(30) == 0 for p in producers)
    finally:
        for p in producers:
            p.kill()
    wait_written()
    assert daemon.stop() == 0
    assert [r.returncode for r in results] == [0] * 6, [r.stdout for r in results if r.returncode]
    assert sum(1 for _ in (home / "logs" / "archive").rglob("*.gz")) > 20  # it did rotate, many times
