"""The log tree on disk: opens, renames and unlinks that never leave it or follow a link."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gzip
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from . import fs
from .folder import UnsafePath, regular_file

DIR_MODE = 0o750
FILE_MODE = 0o640
GZIP_MAGIC = b"\x1f\x8b"  # how readers tell an archive's gzip bytes: under its plain name halfway through its switch to .gz


class LogTree:
    """Opens files below one root through directory descriptors, never following a link."""

    def __init__(self, root: Path, *, durable: bool = False) -> None:
        """`durable`: a missing root is made durable (its parent synced); what is made below it, a syncfs makes durable."""
        self.root = root
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "the log folder is not a folder", str(root))
        if not root.is_dir():
            fs.makedirs(root, DIR_MODE, durable=durable)
            fs.chmod(root, DIR_MODE)
        self._root_fd = fs.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.folders_created = 0  # counted so a flood of new user names can be reported

    @property
    def root_fd(self) -> int:
        return self._root_fd

    def close(self) -> None:
        os.close(self._root_fd)

    @contextlib.contextmanager
    def _folder_of(self, relpath: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
        """The descriptor of `relpath`'s folder (reached without following links) and the last name."""
        *dirs, name = relpath.split("/")
        dir_fd = self._walk(dirs, create=create)
        try:
            yield dir_fd, name
        finally:
            self._close_dir(dir_fd)

    def open_append(self, relpath: str) -> int:
        """Open (creating dirs 0750 and the file 0640) `relpath` for appending."""
        try:  # most files exist already: one openat2() when the kernel has it, no mkdir, no O_CREAT
            return self.open_existing(relpath, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            pass
        with self._folder_of(relpath, create=True) as (dir_fd, name):
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = fs.open(name, flags, FILE_MODE, dir_fd=dir_fd)
            except FileExistsError:
                return self._open_existing(name, os.O_WRONLY | os.O_APPEND, dir_fd, relpath)
            fs.fchmod(fd, FILE_MODE)  # the umask must not decide who may read logs
            return fd

    def open_existing(self, relpath: str, flags: int) -> int:
        """Open a file that must already exist inside the tree."""
        if _openat2 is not None:
            try:
                return regular_file(_openat2(self._root_fd, relpath, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC),
                                relpath)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.EXDEV):
                    raise
                # A link on the way: walked again below, folder by folder, to say which part it is.
        with self._folder_of(relpath) as (dir_fd, name):
            return self._open_existing(name, flags, dir_fd, relpath)

    def reader(self, relpath: str, *, unpacked: bool = False) -> BinaryIO:
        """A regular file of the tree open for reading (`unpacked` from gzip), reached without following a link."""
        handle: BinaryIO = os.fdopen(self.open_existing(relpath, os.O_RDONLY), "rb")
        return gzip.GzipFile(fileobj=handle, mode="rb") if unpacked else handle  # type: ignore[return-value]

    def is_gzip(self, relpath: str) -> bool:
        """Whether a regular file of the tree holds gzip bytes, whatever its name (False when there is none)."""
        try:
            with self.reader(relpath) as handle:
                return is_gzip(handle)
        except FileNotFoundError:
            return False

    def size(self, relpath: str) -> int | None:
        """A regular file's size, never through a link; None when there is none (or something else stands there)."""
        try:
            with self._folder_of(relpath) as (dir_fd, name):
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def rename(self, src: str, dst: str) -> None:
        """Move `src` to `dst` inside the tree (creating dst's folders); refuses to overwrite."""
        with self._folder_of(src) as (src_fd, src_name), self._folder_of(dst, create=True) as (dst_fd, dst_name):
            if _exists(dst_name, dst_fd):
                raise FileExistsError(errno.EEXIST, f"{dst} exists; archives are never overwritten")
            fs.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)

    def replace(self, src: str, dst: str) -> None:
        """Move `src` over `dst` in one step: whoever opens `dst` finds its old bytes or the new ones, never neither."""
        with self._folder_of(src) as (src_fd, src_name), self._folder_of(dst) as (dst_fd, dst_name):
            fs.replace(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)

    def exists(self, relpath: str) -> bool:
        try:
            with self._folder_of(relpath) as (dir_fd, name):
                return _exists(name, dir_fd)
        except FileNotFoundError:
            return False

    def unlink(self, relpath: str) -> None:
        """Remove a file inside the tree; a missing one (or folder) is fine."""
        with contextlib.suppress(FileNotFoundError), self._folder_of(relpath) as (dir_fd, name):
            fs.unlink(name, dir_fd=dir_fd)

    def fsync_dir(self, relpath: str) -> None:
        """Make renames and removals inside the folder `relpath` durable."""
        dir_fd = self._walk([p for p in relpath.split("/") if p], create=False)
        try:
            fs.fsync(dir_fd)
        finally:
            self._close_dir(dir_fd)

    def _close_dir(self, fd: int) -> None:
        if fd != self._root_fd:
            os.close(fd)

    def _open_existing(self, name: str, flags: int, dir_fd: int, relpath: str) -> int:
        try:
            fd = fs.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(errno.ELOOP, f"{relpath} is a symbolic link; not followed") from None
            raise
        return regular_file(fd, relpath)

    def _walk(self, dirs: list[str], *, create: bool) -> int:
        fd = self._root_fd
        for part in dirs:
            if part in ("", ".", ".."):
                raise UnsafePath(errno.EINVAL, f"bad path component {part!r}")
            if create:
                try:
                    fs.mkdir(part, DIR_MODE, dir_fd=fd)
                    fs.chmod(part, DIR_MODE, dir_fd=fd, follow_symlinks=False)
                    self.folders_created += 1
                except FileExistsError:
                    pass
            try:
                nxt = fs.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(exc.errno, f"{part!r} in the log tree is not a plain directory; not followed") from None
                raise
            finally:
                self._close_dir(fd)
            fd = nxt
        return fd


def is_gzip(handle: BinaryIO) -> bool:
    """Whether a file open for reading holds gzip bytes from where it stands (by their magic); its position is kept."""
    head = handle.read(len(GZIP_MAGIC))
    handle.seek(-len(head), os.SEEK_CUR)
    return head == GZIP_MAGIC


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437  # the same number on every architecture (a syscall added after the tables were unified)
_RESOLVE = 0x02 | 0x04 | 0x08  # RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH


def _find_openat2() -> Callable[[int, str, int], int] | None:
    """openat2(2) resolving a whole relative path in one call, never through a link nor out of the tree; None when absent."""
    if sys.platform != "linux":
        return None
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long

    def openat2(dir_fd: int, relpath: str, flags: int) -> int:
        how = _OpenHow(flags, 0, _RESOLVE)
        fd = syscall(_SYS_OPENAT2, dir_fd, os.fsencode(relpath), ctypes.byref(how), ctypes.sizeof(how))
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), relpath)
        return int(fd)

    root = fs.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:  # refused by an old kernel (ENOSYS) or a seccomp filter (EPERM): walk folder by folder instead
        os.close(openat2(root, ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    except OSError:
        return None
    finally:
        os.close(root)
    return openat2


_openat2 = _find_openat2()
