"""Every change apilogd makes to its files goes through apilog.core.fs, the one place to record or fault them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from apilogd.archive.archiver import Archiver
from apilogd.commit.batch import BatchWriter
from apilogd.sources import open_source
from apilogd.state.folders import open_folders, open_home

from apilog import logger, settings
from apilog.core import fs
from apilog.spool.transport import writer_for

BYPASSES = ["write", "pwrite", "ftruncate", "rename", "replace", "unlink", "mkdir", "makedirs", "rmdir", "fsync",
            "fdatasync", "chmod", "fchmod", "link", "posix_fallocate"]


def test_a_drain_with_rotation_compression_and_checkpoints_mutates_only_through_core_fs(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every mutating `os` call made to fail, the daemon's code still drains, seals, rotates, compresses,
    switches to .gz and checkpoints; the observer sees each kind of change it made, in order."""
    monkeypatch.setenv("APILOG_ROTATE_BYTES", "2000")
    settings.reset()
    for n in range(200):
        logger.delay(("INFO", "WARN")[n % 2], f"fs{n % 4}@x.com", f"entry {n:04d}", timestamp=False)
    writer_for(settings.current().spool_dir, False).close()
    seen: list[tuple[str, tuple[Any, ...]]] = []
    bypassed: list[str] = []

    def where(arg: Any, dir_fd: int | None) -> str:
        """The path an os call's first argument names (a descriptor's target, or a name below its dir_fd)."""
        if isinstance(arg, int):
            return os.readlink(f"/proc/self/fd/{arg}")
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
        return os.path.join(base, os.fsdecode(arg))

    def refuse(name: str) -> Any:
        original = getattr(os, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            dir_fd = kwargs.get("dir_fd", kwargs.get("src_dir_fd"))
            if where(args[0], dir_fd).startswith(str(home)):  # apilogd's own files, not a library's pipe
                bypassed.append(f"os.{name}{args[:2]}")
                raise AssertionError(f"os.{name} called around apilog.core.fs")
            return original(*args, **kwargs)
        return call

    conf = settings.load()
    with fs.observe(lambda operation, args: seen.append((operation, args))):
        for name in BYPASSES:
            monkeypatch.setattr(os, name, refuse(name))
        folders = open_folders(conf, open_home(conf))
        writer = BatchWriter(conf, folders, open_source(conf, folders))
        archiver = Archiver(conf, writer)
        try:
            writer.source.look_for_input()
            while writer.step():
                archiver.after_batch()
                archiver.tick()
            archiver.rotate_all()
            deadline = time.monotonic() + 20
            while not writer.archive_ops.qsize() and time.monotonic() < deadline:
                time.sleep(0.05)  # the compressor thread hands its .gz.tmp over
            archiver.close(wait=True)
            writer.step(only_notes=True)  # seals and switches the compressions
            writer.checkpoint()
        finally:
            writer.close()
            folders.close()
        monkeypatch.undo()
    assert bypassed == []
    kinds = {operation for operation, _ in seen}
    assert {"open", "write", "fdatasync", "syncfs", "rename", "replace", "ftruncate"} <= kinds, kinds
    archived = list((conf.log_dir / "archive").rglob("*.gz"))
    assert archived, "nothing was rotated and compressed"
