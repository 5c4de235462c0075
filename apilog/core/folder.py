"""A folder held by descriptor: names inside it are opened relative to it and never through a link.

A folder that someone renames or replaces after it was opened is not followed: the
descriptor keeps pointing at the folder that was opened, so a planted symlink in its
place leads nowhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from . import fs

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


PARENT_MODE = 0o755  # folders made on the way to a configured one


class UnsafePath(OSError):
    """A folder or file is not what it must be (a link, a FIFO, a hard link, another user's): not followed or used."""


def regular_file(fd: int, what: str) -> int:
    """`fd` if it is a regular file's (not a FIFO's, a device's or a folder's); closed and refused otherwise."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(errno.EINVAL, f"{what} is not a regular file")
    return fd


class Folder:
    """One open folder; every method names things inside it."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def at(cls, path: Path, *, create_mode: int | None = None, durable: bool = False) -> Folder:
        """Open a configured folder (following the configured path itself), creating it with `create_mode` (`durable`:
        its parent synced, so that a power cut cannot take it away with what is then made in it)."""
        if create_mode is not None:
            _make(path, create_mode, durable)
        # The configured path itself is the admin's choice and may be a link; what is inside never is.
        return cls(fs.open(path, _DIR_FLAGS), path)

    def sub(self, name: str, *, create_mode: int | None = None, durable: bool = False) -> Folder:
        """A folder inside this one, never reached through a link; created with `create_mode` when missing (`durable`:
        this folder synced then)."""
        if create_mode is not None:
            try:
                fs.mkdir(name, create_mode, dir_fd=self.fd)
                fs.chmod(name, create_mode, dir_fd=self.fd, follow_symlinks=False)
                if durable:
                    fs.fsync(self.fd)
            except FileExistsError:
                pass
        try:
            fd = fs.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePath(exc.errno, f"{self.path / name} is not a plain folder (a link?); not followed") from None
            raise
        return Folder(fd, self.path / name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stat(self, name: str | None = None) -> os.stat_result:
        """The folder's own status, or that of `name` inside it (a link is not followed)."""
        if name is None:
            return os.fstat(self.fd)
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def exists(self, name: str) -> bool:
        try:
            self.stat(name)
        except FileNotFoundError:
            return False
        return True

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def open(self, name: str, flags: int, mode: int = 0o640) -> int:
        """Open `name` inside; a link is refused (ELOOP); a created file gets `mode` whatever the umask."""
        fd = fs.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)
        if flags & os.O_CREAT:
            try:
                fs.fchmod(fd, mode)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def open_regular(self, name: str, flags: int = os.O_RDONLY) -> int:
        """Open an existing regular file inside (no link, FIFO, socket or folder), without blocking."""
        return regular_file(fs.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd),
                            str(self.path / name))

    def open_plain(self, name: str, flags: int, mode: int) -> int:
        """Open, creating it with `mode` if missing, a plain file of our own; a link, FIFO, folder or hard link is refused."""
        try:
            # O_NONBLOCK: a FIFO planted here must not hang us (it is refused below).
            fd = fs.open(name, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise UnsafePath(exc.errno, f"{self.path / name} is not a plain file (a symbolic link?); "
                                            "not followed. Remove it and retry") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise UnsafePath(errno.EINVAL, f"{self.path / name} is not a plain file of its own "
                                               "(a FIFO, device or hard link); not used. Remove it and retry")
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode:
                fs.fchmod(fd, mode)  # just created through the umask, or left loose by an older version
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read(self, name: str, limit: int = 64 * 1024 * 1024) -> bytes:
        """The content of a regular file inside (FileNotFoundError when missing)."""
        fd = self.open_regular(name)
        try:
            chunks = []
            size = 0
            while size < limit and (chunk := os.read(fd, min(1 << 20, limit - size))):
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write_atomic(self, name: str, data: bytes, *, mode: int = 0o640, durable: bool = True) -> None:
        """Replace `name` with `data` so that readers see the old or the new file whole."""
        tmp = f".{name}.tmp"  # callers serialize writers of one name
        with contextlib.suppress(FileNotFoundError):
            fs.unlink(tmp, dir_fd=self.fd)  # a leftover (or a planted link): never written through
        fd = self.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[fs.write(fd, view):]
            if durable:
                fs.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                fs.unlink(tmp, dir_fd=self.fd)
            raise
        os.close(fd)
        fs.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        if durable:
            fs.fsync(self.fd)

    def unlink(self, name: str) -> None:
        """Remove `name`; a missing one is fine."""
        with contextlib.suppress(FileNotFoundError):
            fs.unlink(name, dir_fd=self.fd)

    def rename(self, name: str, new: str, into: Folder | None = None) -> None:
        """Move `name` to `new` (in `into`, else here), replacing nothing: an existing target raises."""
        target = into or self
        try:
            target.stat(new)
        except FileNotFoundError:
            fs.rename(name, new, src_dir_fd=self.fd, dst_dir_fd=target.fd)
            return
        raise FileExistsError(errno.EEXIST, f"{target.path / new} exists; not replaced")

    def set_aside(self, name: str, suffix: str) -> str:
        """Rename `name` to `name.suffix[-N]` beside itself, never over another file; return the new name."""
        for n in range(1000):
            new = f"{name}.{suffix}" + (f"-{n}" if n else "")
            try:
                self.rename(name, new)
                return new
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, f"too many {name}.{suffix} files in {self.path}")

    def fsync(self) -> None:
        fs.fsync(self.fd)



def _make(path: Path, mode: int, durable: bool) -> None:
    """Create `path` with exactly `mode` (missing parents 0755), whatever the umask."""
    if path.is_dir():
        return
    _make(path.parent, PARENT_MODE, durable)
    try:
        fs.mkdir(path, mode)
    except FileExistsError:
        return  # made meanwhile; opening it says whether it is a folder
    fs.chmod(path, mode)  # mkdir's mode passes through the umask
    if durable:
        sync_folder(path.parent)


def sync_folder(path: Path) -> None:
    """Make the names made, renamed or removed inside the folder `path` durable."""
    fd = fs.open(path, _DIR_FLAGS)
    try:
        fs.fsync(fd)
    finally:
        os.close(fd)
