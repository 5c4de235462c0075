"""Every change apilogd makes to a file or folder goes through here: one place to record or fault them.

Opens that may create or write, writes, truncations, renames, removals, folder creation and
the syncs (fsync, fdatasync, syncfs) are thin wrappers over `os`. A test (power-loss replay,
fault injection) registers an observer with `observe()`: it is called with the operation's
name and arguments before the operation runs, and may raise to fault it. With no observer,
each call costs one truth test more than `os` itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Observer = Callable[[str, tuple[Any, ...]], None]
# Bound now: a test that replaces os.write (to prove nothing writes around this module) leaves these working.
_os_open, _os_write, _os_pwrite, _os_ftruncate = os.open, os.write, os.pwrite, os.ftruncate
_os_rename, _os_replace, _os_link = os.rename, os.replace, os.link
_os_unlink, _os_rmdir, _os_mkdir = os.unlink, os.rmdir, os.mkdir
_os_chmod, _os_fchmod, _os_fallocate, _os_fsync, _os_fdatasync = os.chmod, os.fchmod, os.posix_fallocate, os.fsync, os.fdatasync
_observers: list[Observer] = []
_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@contextlib.contextmanager
def observe(observer: Observer) -> Iterator[None]:
    """Call `observer(operation, args)` before every mutation made in this process within the block."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def _note(operation: str, *args: Any) -> None:
    for observer in _observers:
        observer(operation, args)


def open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
    """os.open; noted when it may create or write."""
    if _observers and flags & _WRITES:
        _note("open", path, flags, mode, dir_fd)
    return _os_open(path, flags, mode, dir_fd=dir_fd)


def write(fd: int, data: bytes | memoryview) -> int:
    if _observers:
        _note("write", fd, bytes(data))
    return _os_write(fd, data)


def pwrite(fd: int, data: bytes, offset: int) -> int:
    if _observers:
        _note("pwrite", fd, data, offset)
    return _os_pwrite(fd, data, offset)


def ftruncate(fd: int, length: int) -> None:
    if _observers:
        _note("ftruncate", fd, length)
    _os_ftruncate(fd, length)


def rename(src: Any, dst: Any, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
    if _observers:
        _note("rename", src, dst, src_dir_fd, dst_dir_fd)
    _os_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


def replace(src: Any, dst: Any, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
    if _observers:
        _note("replace", src, dst, src_dir_fd, dst_dir_fd)
    _os_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


def link(src: Any, dst: Any, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
    if _observers:
        _note("link", src, dst, src_dir_fd, dst_dir_fd)
    _os_link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)


def unlink(path: Any, *, dir_fd: int | None = None) -> None:
    if _observers:
        _note("unlink", path, dir_fd)
    _os_unlink(path, dir_fd=dir_fd)


def rmdir(path: Any, *, dir_fd: int | None = None) -> None:
    if _observers:
        _note("rmdir", path, dir_fd)
    _os_rmdir(path, dir_fd=dir_fd)


def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
    if _observers:
        _note("mkdir", path, mode, dir_fd)
    _os_mkdir(path, mode, dir_fd=dir_fd)


def makedirs(path: Path, mode: int, *, durable: bool = False) -> None:
    """os.makedirs(path, mode, exist_ok=True), each missing folder made by `mkdir` here (`durable`: its parent fsynced)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            mkdir(folder, mode)
        except FileExistsError:
            continue
        if not durable:
            continue
        parent = _os_open(folder.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fsync(parent)
        finally:
            os.close(parent)


def chmod(path: Any, mode: int, *, dir_fd: int | None = None, follow_symlinks: bool = True) -> None:
    if _observers:
        _note("chmod", path, mode, dir_fd)
    _os_chmod(path, mode, dir_fd=dir_fd, follow_symlinks=follow_symlinks)


def fchmod(fd: int, mode: int) -> None:
    if _observers:
        _note("fchmod", fd, mode)
    _os_fchmod(fd, mode)


def fallocate(fd: int, offset: int, length: int) -> None:
    if _observers:
        _note("fallocate", fd, offset, length)
    _os_fallocate(fd, offset, length)


def fsync(fd: int) -> None:
    if _observers:
        _note("fsync", fd)
    _os_fsync(fd)


def fdatasync(fd: int) -> None:
    if _observers:
        _note("fdatasync", fd)
    _os_fdatasync(fd)


def syncfs(fd: int) -> None:
    """Flush every file of the file system holding `fd` to disk (one call, whatever the number of files)."""
    if _observers:
        _note("syncfs", fd)
    if _libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
