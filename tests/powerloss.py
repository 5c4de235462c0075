"""Power-loss testing: record a run's file-system operations, build the crash states a power cut may leave, check each.

A run is recorded where the daemon mutates files (`apilog.core.fs.observe`) and where producers append to the
spool (their module's `os`, wrapped): each operation with its path resolved then (descriptors through
/proc/self/fd) and its data kept. The replayer rebuilds the tree from the tree before the run and those
operations; it proves itself by rebuilding the run's final tree byte for byte (`Recording.final_matches`).

The model of a power cut after the first `k` operations (`crash_states`):
- a file's writes and truncations after its last fsync/fdatasync (or a syncfs of its file system) are dropped,
  kept, or kept up to a 4 KiB boundary of the file (each file alike, or each its own way: "mixed");
- a create, mkdir, rename, link, unlink or rmdir not yet made durable by an fsync of its folder (the destination's,
  for a rename) or a syncfs of its file system is undone: the last `u` of them, in order (a suffix); a file's
  creation is durable once a move of it is (a segment made in tmp/, renamed into segments/, that folder synced);
- the log folder is a file system of its own: syncfs of the log tree flushes nothing of the state or the spool.
Then a real apilogd starts on the state, drains, stops, and `check_state` says what went wrong, if anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apilogd.process import control

from apilog import settings
from apilog.core import fs

PAGE = 4096
TOKEN = re.compile(rb"\bt[a-z]\d{5}\b")  # each entry's text: unique in a run
LINE = re.compile(r"[A-Z_]+:  (t[a-z]\d{5})")  # an entry's line, as rendered with timestamps off
NAMESPACE = frozenset({"create", "mkdir", "rename", "link", "unlink", "rmdir"})
DATA_MODES = ("keep", "drop", "page", "mixed")
EXIT_REFUSED = 78  # EX_CONFIG: apilogd refuses to start until `apilogd repair`


@dataclass
class Op:
    """One recorded operation; paths are relative to the recorded folder."""

    kind: str  # create mkdir write truncate rename link unlink rmdir chmod sync dirsync syncfs
    path: str
    other: str = ""  # a rename's or link's destination
    data: bytes = b""
    offset: int = 0  # a write's offset, a truncation's length
    mode: int = 0


@dataclass
class Node:
    """A file or folder of the model; shared by every name a link gives it."""

    is_dir: bool
    mode: int
    data: bytes = b""
    synced: bytes = b""  # what is on disk for sure: as of its last sync


Tree = dict[str, tuple[bool, int, bytes]]  # relpath -> (is a folder, mode, content)


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> Tree:
    """Every folder and file below `root` (no links are expected), with mode and content."""
    tree: Tree = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel.startswith(skip):
                continue
            st = os.lstat(full)
            is_dir = os.path.isdir(full)
            tree[rel] = (is_dir, st.st_mode & 0o7777, b"" if is_dir else Path(full).read_bytes())
    return tree


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


class Recorder:
    """An `fs.observe` observer that keeps every mutation below `root` as an `Op`, and when each entry became acknowledged."""

    def __init__(self, root: Path, journal: str = "state/journal") -> None:
        self.root = str(root)
        self.journal = journal
        self.ops: list[Op] = []
        self.acks: dict[str, int] = {}  # token -> number of operations after which it is acknowledged
        self._in_journal: set[str] = set()  # tokens written to the journal since its last sync

    def _rel(self, full: str) -> str | None:
        full = os.path.normpath(full)
        if full.endswith(" (deleted)") or not full.startswith(self.root + "/"):
            return None
        return full[len(self.root) + 1:]

    def _at(self, path: Any, dir_fd: int | None) -> str:
        name = os.fsdecode(path)
        base = os.getcwd() if dir_fd is None else os.readlink(f"/proc/self/fd/{dir_fd}")
        return os.path.join(base, name)

    def _of(self, fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def acknowledge(self, tokens: list[str]) -> None:
        """A producer's call returned with these entries durable (its fdatasync done)."""
        for token in tokens:
            self.acks.setdefault(token, len(self.ops))

    def _add(self, op: Op) -> None:
        self.ops.append(op)

    def __call__(self, operation: str, args: tuple[Any, ...]) -> None:
        getattr(self, f"_{operation}")(*args)

    def _open(self, path: Any, flags: int, mode: int, dir_fd: int | None) -> None:
        full = self._at(path, dir_fd)
        rel = self._rel(full)
        if rel is None:
            return
        exists = os.path.lexists(full)
        if flags & os.O_CREAT and not exists:
            self._add(Op("create", rel, mode=mode & 0o7777))
        elif flags & os.O_TRUNC and exists and not flags & os.O_EXCL:
            self._add(Op("truncate", rel, offset=0))

    def _write(self, fd: int, data: bytes) -> None:
        rel = self._rel(self._of(fd))
        if rel is None:
            return
        at = os.fstat(fd).st_size if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND else os.lseek(fd, 0, os.SEEK_CUR)
        self._pwrite(fd, data, at, rel)

    def _pwrite(self, fd: int, data: bytes, offset: int, rel: str | None = None) -> None:
        rel = rel or self._rel(self._of(fd))
        if rel is None:
            return
        self._add(Op("write", rel, data=bytes(data), offset=offset))
        if rel == self.journal:
            self._in_journal.update(t.decode() for t in TOKEN.findall(data))

    def _ftruncate(self, fd: int, length: int) -> None:
        rel = self._rel(self._of(fd))
        if rel is not None:
            self._add(Op("truncate", rel, offset=length))

    def _fallocate(self, fd: int, offset: int, length: int) -> None:
        rel = self._rel(self._of(fd))
        if rel is not None and offset + length > os.fstat(fd).st_size:
            self._add(Op("truncate", rel, offset=offset + length))

    def _move(self, kind: str, src: Any, dst: Any, src_dir_fd: int | None, dst_dir_fd: int | None) -> None:
        full_src, full_dst = self._at(src, src_dir_fd), self._at(dst, dst_dir_fd)
        rel_src, rel_dst = self._rel(full_src), self._rel(full_dst)
        if rel_src is None or rel_dst is None or not os.path.lexists(full_src):
            return  # fails: nothing changes
        if kind == "link" and os.path.lexists(full_dst):
            return
        self._add(Op(kind, rel_src, other=rel_dst))

    def _rename(self, *args: Any) -> None:
        self._move("rename", *args)

    def _replace(self, *args: Any) -> None:
        self._move("rename", *args)

    def _link(self, *args: Any) -> None:
        self._move("link", *args)

    def _unlink(self, path: Any, dir_fd: int | None) -> None:
        full = self._at(path, dir_fd)
        rel = self._rel(full)
        if rel is not None and os.path.lexists(full):
            self._add(Op("unlink", rel))

    def _rmdir(self, path: Any, dir_fd: int | None) -> None:
        full = self._at(path, dir_fd)
        rel = self._rel(full)
        if rel is not None and os.path.isdir(full) and not os.listdir(full):
            self._add(Op("rmdir", rel))

    def _mkdir(self, path: Any, mode: int, dir_fd: int | None) -> None:
        full = self._at(path, dir_fd)
        rel = self._rel(full)
        if rel is not None and not os.path.lexists(full):
            self._add(Op("mkdir", rel, mode=mode & 0o7777))

    def _chmod(self, path: Any, mode: int, dir_fd: int | None) -> None:
        full = self._at(path, dir_fd)
        rel = self._rel(full)
        if rel is not None and os.path.lexists(full):
            self._add(Op("chmod", rel, mode=mode & 0o7777))

    def _fchmod(self, fd: int, mode: int) -> None:
        rel = self._rel(self._of(fd))
        if rel is not None:
            self._add(Op("chmod", rel, mode=mode & 0o7777))

    def _fsync(self, fd: int) -> None:
        full = self._of(fd)
        rel = self._rel(full) if full != self.root else ""
        if rel is None:
            return
        self._add(Op("dirsync" if os.path.isdir(full) else "sync", rel))
        if rel == self.journal:
            for token in self._in_journal:  # in a committed record: apilogd has promised it
                self.acks.setdefault(token, len(self.ops))
            self._in_journal.clear()

    def _fdatasync(self, fd: int) -> None:
        self._fsync(fd)

    def _syncfs(self, fd: int) -> None:
        full = self._of(fd)
        rel = self._rel(full) if full != self.root else ""
        if rel is not None:
            self._add(Op("syncfs", rel))


class _RecordedOs:
    """The `os` a producer module sees while recorded: its mutations go through core.fs (and so to the observer)."""

    open = staticmethod(fs.open)
    write = staticmethod(fs.write)
    rename = staticmethod(fs.rename)
    unlink = staticmethod(fs.unlink)
    fchmod = staticmethod(fs.fchmod)
    fdatasync = staticmethod(fs.fdatasync)
    fsync = staticmethod(fs.fsync)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@contextlib.contextmanager
def recording_producers() -> Iterator[None]:
    """Producers' spool appends, renames and syncs go through core.fs within the block (the spool writer uses `os`)."""
    from apilog.spool import writer

    saved = writer.os
    writer.os = _RecordedOs()  # type: ignore[assignment]
    try:
        yield
    finally:
        writer.os = saved


@dataclass
class Recording:
    """A recorded run: the tree before it, its operations, the tree after it, and what its checks need."""

    name: str
    env: dict[str, str]  # APILOG_ settings of the run (APILOG_HOME excluded)
    initial: Tree
    ops: list[Op]
    final: Tree
    acks: dict[str, int]  # token -> operations after which it is acknowledged (0: before the run)
    produced: set[str]
    key: str  # the verification key, K(0)
    log_root: str = "logs"  # a file system of its own
    skip: tuple[str, ...] = ("spool/limits",)  # the limits table: counters written through a shared mapping

    def final_matches(self) -> list[str]:
        """Where the tree rebuilt from the operations differs from the run's final tree (empty: byte for byte)."""
        state = next(iter(crash_states(self, [len(self.ops)], modes=("keep",), undos=(0,))))
        built = {p: v for p, v in state.tree.items() if not p.startswith(self.skip)}
        real = {p: v for p, v in self.final.items() if not p.startswith(self.skip)}
        diffs = [f"only rebuilt: {p}" for p in sorted(built.keys() - real.keys())]
        diffs += [f"only real: {p}" for p in sorted(real.keys() - built.keys())]
        diffs += [f"differs: {p} ({len(built[p][2])} rebuilt, {len(real[p][2])} real bytes)"
                  for p in sorted(built.keys() & real.keys()) if built[p][::2] != real[p][::2]]
        return diffs


@dataclass
class CrashState:
    """One tree a power cut may leave."""

    cut: int  # operations done
    mode: str  # what became of unsynced data
    undone: int  # namespace operations undone
    tree: Tree
    acked: set[str]

    @property
    def digest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for path in sorted(self.tree):
            is_dir, _, data = self.tree[path]
            h.update(f"{path}\0{is_dir}\0{len(data)}\0".encode())
            h.update(data)
        return h.hexdigest()

    @property
    def kind(self) -> str:
        return f"{self.mode}, {'none' if not self.undone else 'some'} undone"

    def write(self, home: Path) -> None:
        home.mkdir(parents=True)
        for path in sorted(self.tree, key=lambda p: p.count("/")):
            is_dir, mode, data = self.tree[path]
            full = home / path
            if is_dir:
                full.mkdir()
            else:
                full.write_bytes(data)
            os.chmod(full, mode)


def _durable_at(rec: Recording) -> list[int]:
    """For each operation, how many operations are done when it is durable (len(ops) + 1: never)."""
    never = len(rec.ops) + 1
    durable = [never] * len(rec.ops)
    waiting: list[int] = []  # namespace operations not durable yet
    for j, op in enumerate(rec.ops):
        if op.kind in NAMESPACE:
            waiting.append(j)
        elif op.kind in ("dirsync", "syncfs"):
            covered = _covers(rec, op)
            for i in [i for i in waiting if covered(_folder(rec.ops[i]))]:
                durable[i] = j + 1
                waiting.remove(i)
    return durable


def _folder(op: Op) -> str:
    return _parent(op.other if op.kind in ("rename", "link") else op.path)


def _file_system(rec: Recording, path: str) -> str:
    return rec.log_root if path == rec.log_root or path.startswith(rec.log_root + "/") else ""


def _covers(rec: Recording, op: Op) -> Callable[[str], bool]:
    """Which folders' (or files') pending changes a dirsync or syncfs makes durable."""
    if op.kind == "dirsync":
        return lambda folder: folder == op.path
    system = _file_system(rec, op.path)
    return lambda path: _file_system(rec, path) == system


def crash_states(rec: Recording, cuts: list[int], *, modes: tuple[str, ...] = DATA_MODES,
                 undos: tuple[int, ...] | None = None) -> Iterator[CrashState]:
    """The crash states after each of `cuts` operations (ascending): for each data mode, each number of undone
    namespace operations (`undos`; None: none, one, half and all of them)."""
    durable = _durable_at(rec)
    nodes: dict[str, Node] = {p: Node(d, m, c, c) for p, (d, m, c) in rec.initial.items()}
    start = dict(nodes)
    touched: list[tuple[int, Op, Node | None]] = []  # namespace operations done, with the node each concerns
    done = 0
    for cut in cuts:
        for j in range(done, cut):
            touched.extend(_apply(rec, nodes, rec.ops[j], j))
        done = cut
        pending = [i for i, at in _effective(touched, durable) if at > cut]
        counts = sorted({0, min(1, len(pending)), len(pending) // 2, len(pending)} if undos is None
                        else {u for u in undos if u <= len(pending)})
        acked = {t for t, at in rec.acks.items() if at <= cut}
        view = {id(n): (n.data, n.synced) for n in _all_nodes(nodes, touched, start)}
        for undone in counts:
            names = _names(start, touched, set(pending[len(pending) - undone:]))
            for mode in modes:
                tree = {path: (node.is_dir, node.mode, b"" if node.is_dir else _content(view[id(node)], mode, path, cut))
                        for path, node in names.items()}
                yield CrashState(cut, mode, undone, tree, acked)


def _effective(touched: list[tuple[int, Op, Node | None]], durable: list[int]) -> list[tuple[int, int]]:
    """(operation, when it is durable), a node's creation counting as durable once a move of that node is: the
    file is then on disk under its new name, whatever became of the name it was made under."""
    moved: dict[int, int] = {}  # node -> when its first later move is durable
    out = []
    for i, op, node in reversed(touched):
        at = durable[i]
        if node is not None and op.kind in ("create", "mkdir", "rename", "link"):
            at = min(at, moved.get(id(node), at))
            if op.kind in ("rename", "link"):
                moved[id(node)] = at
        out.append((i, at))
    return out[::-1]


def _all_nodes(nodes: dict[str, Node], touched: list[tuple[int, Op, Node | None]], start: dict[str, Node]) -> list[Node]:
    found = {id(n): n for n in [*nodes.values(), *start.values(), *(n for _, _, n in touched if n is not None)]}
    return list(found.values())


def _content(view: tuple[bytes, bytes], mode: str, path: str, cut: int) -> bytes:
    data, synced = view
    if mode == "mixed":
        mode = ("keep", "drop", "page")[int(hashlib.md5(f"{path}{cut}".encode()).hexdigest(), 16) % 3]  # noqa: S324
    if mode == "keep" or data == synced:
        return data
    if mode == "drop":
        return synced
    same = _common_prefix(data, synced)
    page = len(data) // PAGE * PAGE
    return data[:page] if page > same else synced


def _common_prefix(a: bytes, b: bytes) -> int:
    low, high = 0, min(len(a), len(b))
    while low < high:  # a[:low] == b[:low]; the first difference is at or before `high`
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _apply(rec: Recording, nodes: dict[str, Node], op: Op, j: int) -> list[tuple[int, Op, Node | None]]:
    """Do `op` to the live model; return the namespace operation it was, with its node, for the crash states."""
    kind = op.kind
    if kind == "create":
        nodes[op.path] = node = Node(False, op.mode)
        return [(j, op, node)]
    if kind == "mkdir":
        nodes[op.path] = node = Node(True, op.mode)
        return [(j, op, node)]
    if kind == "write":
        node = nodes[op.path]
        data = node.data
        if len(data) < op.offset:
            data += b"\0" * (op.offset - len(data))
        node.data = data[:op.offset] + op.data + data[op.offset + len(op.data):]
    elif kind == "truncate":
        node = nodes[op.path]
        node.data = node.data[:op.offset] + b"\0" * max(0, op.offset - len(node.data))
    elif kind == "chmod":
        nodes[op.path].mode = op.mode
    elif kind == "sync":
        nodes[op.path].synced = nodes[op.path].data
    elif kind == "syncfs":
        system = _file_system(rec, op.path)
        for path, node in nodes.items():
            if _file_system(rec, path) == system:
                node.synced = node.data
    elif kind in NAMESPACE:
        node = nodes.get(op.path)
        _rename_in(nodes, op)
        return [(j, op, node)]
    return []


def _rename_in(names: dict[str, Node], op: Op) -> None:
    """A rename, link, unlink or rmdir applied to a namespace (a folder's names move with it)."""
    if op.kind in ("unlink", "rmdir"):
        names.pop(op.path, None)
    elif op.kind == "link":
        names[op.other] = names[op.path]
    elif op.kind == "rename":
        prefix = op.path + "/"
        for path in [p for p in names if p == op.path or p.startswith(prefix)]:
            names[op.other + path[len(op.path):]] = names.pop(path)


def _names(start: dict[str, Node], touched: list[tuple[int, Op, Node | None]], undone: set[int]) -> dict[str, Node]:
    """The names a crash state holds: those before the run, then every namespace operation not undone whose folder exists."""
    names = dict(start)
    for i, op, node in touched:
        if i in undone:
            continue
        if op.kind in ("create", "mkdir"):
            if _parent(op.path) in names or "/" not in op.path:
                assert node is not None
                names[op.path] = node
        elif op.path in names and (op.kind in ("unlink", "rmdir") or _parent(op.other) in names or "/" not in op.other):
            _rename_in(names, op)
    return names


# Checking a crash state with a real apilogd.


@dataclass
class Outcome:
    """What went wrong on one crash state (nothing, when every list is empty and the codes are 0)."""

    state: str
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    start_code: int | None = None  # the exit code when apilogd did not become ready (78: refused)
    stop_code: int = 0
    verify: str = ""  # verify's report when it failed
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return not (self.lost or self.doubled or self.torn or self.unknown or self.verify) and \
            self.start_code is None and self.stop_code == 0

    def __str__(self) -> str:
        parts = [f"{k}={v[:5]}" for k, v in (("lost", self.lost), ("doubled", self.doubled), ("torn", self.torn),
                                             ("unknown", self.unknown)) if v]
        if self.start_code is not None:
            parts.append(f"did not start (exit {self.start_code})")
        if self.stop_code:
            parts.append(f"stopped with {self.stop_code}")
        if self.verify:
            parts.append(f"verify: {self.verify[-600:]}")
        if parts:
            parts.append(f"stderr: {self.stderr[-1500:]}")
        return f"{self.state}: " + "; ".join(parts or ["ok"])


def entries_in(logs: Path) -> tuple[dict[str, int], list[str]]:
    """How often each entry is in the users' live files and archives, and which of those files hold a torn or foreign line."""
    counts: dict[str, int] = {}
    torn: list[str] = []
    for top in (logs / "users", logs / "archive" / "users"):
        for path in sorted(top.rglob("*")) if top.is_dir() else []:
            if not path.is_file() or path.name.endswith(".tmp"):
                continue
            raw = path.read_bytes()
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            text = raw.decode("utf-8", "replace")
            if text and not text.endswith("\n"):
                torn.append(f"{path.relative_to(logs)} ends in a torn line")
            for line in text.splitlines():
                match = LINE.fullmatch(line)
                if match is None:
                    torn.append(f"{path.relative_to(logs)}: {line[:60]!r}")
                    continue
                counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts, torn


def _environment(rec: Recording, home: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("APILOG_") and k not in ("STATE_DIRECTORY", "LOGS_DIRECTORY", "NOTIFY_SOCKET")}
    return {**base, **rec.env, "APILOG_HOME": str(home)}


def check_state(rec: Recording, state: CrashState, where: Path, timeout: float = 60.0) -> Outcome:
    """Start a real apilogd on `state` (written below `where`), let it drain, stop it, and check what it left."""
    from .utils import Daemon

    home = where / "home"
    state.write(home)
    env = _environment(rec, home)
    outcome = Outcome(f"{rec.name} cut {state.cut}/{len(rec.ops)} {state.mode} undone {state.undone}")
    daemon = Daemon(where, env=env)
    try:
        if not daemon.ready():
            outcome.start_code = daemon.exit_code()
            outcome.stderr = daemon.stderr
            return outcome
        conf = settings.load(env)
        deadline = time.monotonic() + timeout
        while control.status(conf).backlog:
            if time.monotonic() > deadline:
                outcome.verify = "apilogd did not drain the spool in time"
                break
            time.sleep(0.05)
    finally:
        outcome.stop_code = daemon.stop()
        outcome.stderr = daemon.stderr
    key = where / "verification.key"
    waiting = home / "state" / "seal.verify"  # a run from the first start: the key is still there, not taken
    key.write_text(waiting.read_text() if waiting.exists() else rec.key + "\n")
    verified = subprocess.run([sys.executable, "-m", "apilog", "verify", "--key", str(key)], capture_output=True,
                              text=True, env=env, timeout=120)
    if verified.returncode != 0:
        outcome.verify = verified.stdout + verified.stderr
    counts, outcome.torn = entries_in(home / "logs")
    outcome.lost = sorted(t for t in state.acked if t not in counts)
    outcome.doubled = sorted(t for t, n in counts.items() if n > 1)
    outcome.unknown = sorted(t for t in counts if t not in rec.produced)
    return outcome


def cut_points(rec: Recording, limit: int | None = None) -> list[int]:
    """Where to cut: around every sync and namespace operation (where durability changes), then evenly, up to `limit`."""
    around = set()
    for j, op in enumerate(rec.ops):
        if op.kind in ("sync", "dirsync", "syncfs") or op.kind in NAMESPACE:
            around.update((j, j + 1))
    every = sorted(around | {0, len(rec.ops)})
    if limit is None or len(every) <= limit:
        return every
    step = len(every) / limit
    return sorted({every[int(i * step)] for i in range(limit)} | {len(rec.ops)})


# The workloads: real drain code run in this process, recorded.


class _Crash(BaseException):
    """The power goes out (raised by an observer; a BaseException, so that no handler takes it for a failure)."""


def _payload(stream: str, user: str, text: str) -> bytes:
    from apilog.core import wire
    from apilog.core.entry import build
    from apilog.core.streams import Registry

    entry, _ = build(stream, user, text, timestamp=False, registry=Registry(Path("/nonexistent")),
                     timestamps_default=False, max_entry_bytes=65536)
    return wire.encode(entry)


class Producers:
    """Two producers' segment writers (APILOG_FSYNC=always and batch) logging unique tokens over a few users."""

    def __init__(self, conf: settings.Settings, letter: str) -> None:
        from apilog.spool.writer import SpoolWriter

        self.letter = letter
        self.count = 0
        self.produced: set[str] = set()
        self.recorder: Recorder | None = None  # acknowledgements go to it once recording began
        self.writers = {synced: SpoolWriter(conf.spool_dir, fsync=synced) for synced in (True, False)}

    def log(self, count: int, *, synced: bool) -> None:
        for _ in range(count):
            n, self.count = self.count, self.count + 1
            token = f"t{self.letter}{n:05d}"
            self.writers[synced].append(_payload(("INFO", "WARN")[n % 2], f"pl{n % 5}", token))
            self.produced.add(token)
            if synced and self.recorder is not None:
                self.recorder.acknowledge([token])

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


@contextlib.contextmanager
def environment(home: Path, env: dict[str, str]) -> Iterator[settings.Settings]:
    """This process's APILOG_ settings for `home` within the block."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("APILOG_") or n in ("STATE_DIRECTORY", "LOGS_DIRECTORY")]:
        del os.environ[name]
    os.environ.update(env, APILOG_HOME=str(home))
    settings.reset()
    try:
        yield settings.load()
    finally:
        os.environ.clear()
        os.environ.update(saved)
        settings.reset()


@contextlib.contextmanager
def drainer(conf: settings.Settings) -> Iterator[Any]:
    """The daemon's drain code (a BatchWriter over the spool) as `apilogd run` opens it, closed after the block."""
    from apilogd.commit.batch import BatchWriter
    from apilogd.sources import open_source
    from apilogd.state.folders import open_folders, open_home

    home = open_home(conf)
    folders = open_folders(conf, home)
    try:
        writer = BatchWriter(conf, folders, open_source(conf, folders))
        try:
            yield writer
        finally:
            writer.close()
    finally:
        folders.close()
        home.close()


def first_start(conf: settings.Settings) -> str:
    """apilogd's first start (its key, the chain's first line); return the verification key `apilogd seal-key` prints."""
    from apilogd.commit.sealer import take_verification_key

    from apilog.core.folder import Folder

    with drainer(conf) as writer:
        writer.checkpoint()
    with Folder.at(conf.state_dir) as state:
        key = take_verification_key(state)
    assert key is not None
    return key


def drain(writer: Any, *, until_idle: bool = True) -> None:
    """Steps until the spool has nothing left and every drained segment is gone (or a few seconds passed)."""
    deadline = time.monotonic() + 5
    while True:
        writer.source.look_for_input()
        if not writer.step() and (not until_idle or not os.listdir(writer.folders.segments.path)
                                  or time.monotonic() > deadline):
            return
        time.sleep(0.01)


def record(name: str, base: Path, env: dict[str, str], letter: str,
           prepare: Callable[[settings.Settings, Producers], None],
           run: Callable[[settings.Settings, Producers, Recorder], None], *, started: bool = True) -> Recording:
    """Prepare a home (apilogd's first start unless not `started`, then `prepare`: the tree before the run, durable),
    then record `run`."""
    from apilog.spool import writer as spool_writer

    home = base / name / "home"
    with environment(home, env) as conf:
        key = first_start(conf) if started else ""
        producers = Producers(conf, letter)
        prepare(conf, producers)
        initial = snapshot(home)
        recorder = Recorder(home)
        recorder.acknowledge(sorted(producers.produced))  # in the tree before the run, durable
        producers.recorder = recorder
        with fs.observe(recorder), recording_producers():
            run(conf, producers, recorder)
            producers.close()
        assert spool_writer.os is os  # restored
    return Recording(name, env, initial, recorder.ops, snapshot(home), recorder.acks, producers.produced, key)


def _backlog(conf: settings.Settings, producers: Producers) -> None:
    producers.log(300, synced=False)
    producers.close()


def _one_batch(conf: settings.Settings, producers: Producers, recorder: Recorder) -> None:
    with drainer(conf) as writer:
        writer.source.look_for_input()
        writer.step()
        writer.step()  # idle: the checkpoint, and the drained segment removed


def record_backlog(base: Path) -> Recording:
    """A backlog of 300 entries over five users drained in one batch, then a checkpoint."""
    return record("backlog", base, {"APILOG_FSYNC": "batch"}, "a", _backlog, _one_batch)


def _rotate_and_compress(conf: settings.Settings, producers: Producers, recorder: Recorder) -> None:
    from apilogd.archive.archiver import Archiver

    with drainer(conf) as writer:
        writer.source.look_for_input()
        writer.step()
        archiver = Archiver(conf, writer)
        archiver.close()  # its threads stopped: compression runs here, in order, as its thread would
        archiver.rotate_all()  # `apilog archive`
        for path in sorted((conf.log_dir / "archive").rglob("*.log")):
            archiver.compress(str(path.relative_to(conf.log_dir)))
        producers.log(40, synced=True)  # new live files beside the archives
        drain(writer, until_idle=False)
        archiver.after_batch()
        archiver.tick()  # rotated by size (APILOG_ROTATE_BYTES)
        for path in sorted((conf.log_dir / "archive").rglob("*.log")):
            archiver.compress(str(path.relative_to(conf.log_dir)))
        drain(writer, until_idle=False)
        writer.checkpoint()


def record_rotation(base: Path) -> Recording:
    """The backlog drained in one batch, every file rotated and gzipped, more entries, rotation by size."""
    return record("rotation", base, {"APILOG_FSYNC": "batch", "APILOG_ROTATE_BYTES": "1500", "APILOG_SEAL_EPOCH": "2"},
                  "b", _backlog, _rotate_and_compress)


def _busy(conf: settings.Settings, producers: Producers, recorder: Recorder) -> None:
    from apilogd.commit import batch

    from apilog.spool import writer as spool_writer

    saved = batch.CHECKPOINT_EVERY, spool_writer.SEGMENT_BYTES
    batch.CHECKPOINT_EVERY = 1e9  # checkpoints only where this run says: several batches wait in the journal
    spool_writer.SEGMENT_BYTES = 4096  # producers roll to new segments; drained ones are removed
    try:
        with drainer(conf) as writer:
            for round_ in range(36):
                producers.log(3, synced=True)
                producers.log(3, synced=False)
                writer.source.look_for_input()
                writer.step()
                if round_ % 6 == 5:
                    writer.checkpoint()
                time.sleep(0.08)  # several seal epochs (APILOG_SEAL_EPOCH=1) end during the run
            producers.close()
            drain(writer)
    finally:
        batch.CHECKPOINT_EVERY, spool_writer.SEGMENT_BYTES = saved


def record_busy(base: Path) -> Recording:
    """Producers (fsync always and batch) logging while batches are drained, checkpoints every sixth, epochs ending."""
    return record("busy", base, {"APILOG_FSYNC": "batch", "APILOG_SEAL_EPOCH": "1"}, "c",
                  lambda conf, producers: None, _busy)


def _torn_journal(conf: settings.Settings, producers: Producers) -> None:
    """The backlog, and a crash half-way through its batch's journal record."""
    _backlog(conf, producers)
    crashed = False

    def tear(operation: str, args: tuple[Any, ...]) -> None:
        nonlocal crashed
        if crashed:
            raise _Crash
        if operation == "write" and os.readlink(f"/proc/self/fd/{args[0]}").endswith("/state/journal"):
            os.write(args[0], args[1][:len(args[1]) // 2])
            crashed = True
            raise _Crash

    with fs.observe(tear), contextlib.suppress(_Crash), drainer(conf) as writer:
        writer.source.look_for_input()
        writer.step()


def record_torn(base: Path) -> Recording:
    """A start on a journal whose last record a crash tore: recovery cuts it, and the batch is drained again."""
    return record("torn", base, {"APILOG_FSYNC": "batch"}, "d", _torn_journal, _one_batch)


def record_first(base: Path) -> Recording:
    """apilogd's first start (its key, the chain's first line) on a backlog, drained in one batch."""
    return record("first", base, {"APILOG_FSYNC": "batch"}, "e", _backlog, _one_batch, started=False)


WORKLOADS: dict[str, Callable[[Path], Recording]] = {
    "backlog": record_backlog, "rotation": record_rotation, "busy": record_busy, "torn": record_torn,
    "first": record_first}
