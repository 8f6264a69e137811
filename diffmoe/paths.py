"""Paths a command writes to: the checks that make a wrong one fail with one clear line before
any work is done, the disk a path lives on, and the advisory lock a writer holds on a
directory."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

from .errors import DiffMoEError

KIB = 1024
SIZE_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # what a write into a full disk (or quota) raises
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
STAMP_FORMAT = "%Y%m%d-%H%M%S"  # the time in the name of something moved aside
LOCK_FILE_MODE = 0o644  # rw-r--r--


def user_path(path: str) -> str:
    """A path as a shell reads it: a leading ``~`` or ``~user`` is that home directory (the one
    expansion a shell does not make inside ``key=~/dir`` or a quoted word). Every path a user
    gives (config keys, command-line options, the Python API) goes through it."""
    return os.path.expanduser(path)


def file_in_the_way(path: Path) -> Optional[Path]:
    """The nearest existing ``path`` or ancestor of it that is not a directory (so nothing can be
    created at ``path``), or None."""
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def is_utf8(path: str | Path) -> bool:
    """Whether the name can be written as UTF-8 (a name that is not arrives in Python with lone
    surrogates, which logs, JSON and YAML cannot hold)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its ancestors that do not exist yet, deepest first."""
    return [p for p in (Path(path), *Path(path).parents) if not p.exists() and p != p.parent]


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove each of ``dirs`` (deepest first) while it is empty."""
    for path in dirs:
        try:
            path.rmdir()
        except OSError:
            return


def holds_something(path: Path, is_dir: bool) -> bool:
    """Whether writing ``path`` (a file, or with ``is_dir`` a directory to write files into)
    could replace or mix with something there: it is a non-empty file, a non-empty directory,
    or not the kind of entry expected."""
    if not os.path.lexists(path):
        return False
    if path.is_symlink() or path.is_dir() != is_dir:
        return True
    return any(path.iterdir()) if is_dir else path.stat().st_size > 0


def stamped(path: Path) -> Path:
    """``path`` with the time appended (``<name>-YYYYmmdd-HHMMSS``), and ``-2``, ``-3``, ... if
    that exists too: a new name for something moved aside."""
    first = path.with_name(f"{path.name}-{time.strftime(STAMP_FORMAT)}")
    candidate, n = first, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = first.with_name(f"{first.name}-{n}")
    return candidate


def size_text(num_bytes: float) -> str:
    """``num_bytes`` in the largest binary unit that keeps it at 1 or more, e.g. ``12.5 MiB``."""
    size, unit = float(num_bytes), 0
    while size >= KIB and unit < len(SIZE_UNITS) - 1:
        size /= KIB
        unit += 1
    return f"{size:.0f} {SIZE_UNITS[0]}" if unit == 0 else f"{size:.1f} {SIZE_UNITS[unit]}"


def disk_of(path: Path) -> str:
    """The disk ``path`` (or its nearest existing ancestor) is on, in words: its mount point and
    how much of it is free."""
    existing = Path(os.path.abspath(path))
    while not existing.exists():
        existing = existing.parent
    mount = existing
    while not os.path.ismount(mount):
        mount = mount.parent
    usage = shutil.disk_usage(existing)
    return f"mounted at '{mount}', {size_text(usage.free)} free of {size_text(usage.total)}"


@dataclass(frozen=True)
class Holder:
    """Who holds a :class:`DirectoryLock`, as written into its file."""

    pid: int
    host: str
    started: str

    @classmethod
    def here(cls) -> "Holder":
        return cls(os.getpid(), socket.gethostname(), time.strftime(TIME_FORMAT))

    @classmethod
    def parse(cls, text: str) -> Optional["Holder"]:
        try:
            record = json.loads(text)
            return cls(int(record["pid"]), str(record["host"]), str(record["started"]))
        except (ValueError, KeyError, TypeError):
            return None

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started}"


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is who (None if its file says nothing)."""

    def __init__(self, holder: Optional[Holder]):
        super().__init__(str(holder))
        self.holder = holder


class NotALockFile(Exception):
    """The lock's file holds something that is not a :class:`Holder` record."""


class DirectoryLock:
    """An advisory lock (``flock``) on the file ``path``, which names the holder while it is
    held and is removed when it is let go. The kernel lets go of a lock whose process died, so
    a file left behind with a holder in it is a stale lock: :meth:`acquire` takes it over and
    returns that holder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: Optional[int] = None

    def acquire(self) -> Optional[Holder]:
        """Hold the lock; returns the holder of a stale lock taken over (None if there was
        none). Raises :class:`LockHeld` if another process holds it, :class:`NotALockFile` if
        the file holds something else, and ``OSError`` if the file cannot be created."""
        fd = self._open_locked()
        previous = os.read(fd, os.fstat(fd).st_size).decode("utf-8", "replace")
        stale = Holder.parse(previous)
        if previous.strip() and stale is None:
            os.close(fd)
            raise NotALockFile(str(self.path))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(Holder.here())).encode(), 0)
        self.fd = fd
        return stale

    def _open_locked(self) -> int:
        """The lock file, open and locked. A holder that lets go removes the file first, so a
        lock won on a file no longer at ``path`` is let go and the new file locked instead."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, LOCK_FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = Holder.parse(os.read(fd, os.fstat(fd).st_size).decode("utf-8",
                                                                                "replace"))
                os.close(fd)
                raise LockHeld(holder) from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def release(self) -> None:
        """Let go of the lock (nothing if it is not held here) and remove its file."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


# -- the files a command will write ----------------------------------------------------------
# Every command lists all the files it will write (its main output and each file beside it)
# and passes them here before any work starts, so the rule is written once: an existing file is
# refused unless --force, a directory in the way is always refused, and each location must be
# creatable and writable.

def nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor."""
    return next(p for p in (Path(path), *Path(path).parents) if p.exists())


def writable(directory: Path) -> bool:
    """Whether this process may create files in the existing ``directory``."""
    return os.access(directory, os.W_OK | os.X_OK)


def check_outputs(paths: Iterable[str | Path], force: bool, option: str = "--out") -> list[Path]:
    """Refuse, in one ``DiffMoEError`` line naming the file, any of ``paths`` (the files one
    command will write, given by the user as ``option``) that already exists (unless ``force``),
    is a directory, lies under a file, or lies in a directory that cannot be written. Returns
    the paths, for the command to write afterwards."""
    planned = [Path(p) for p in paths]
    for path in planned:
        if path.is_dir():
            raise DiffMoEError(f"{option} '{path}' is a directory, where a file is to be "
                               f"written; choose another {option}")
        if path.exists() and not force:
            raise DiffMoEError(f"output '{path}' already exists; pass --force to replace it or "
                               f"choose another {option}")
        blocker = file_in_the_way(path.parent)
        if blocker is not None:
            raise DiffMoEError(f"{option} '{path}' cannot be written: '{blocker}' is a file, not "
                               f"a directory; choose another {option}")
        where = nearest_existing(path.parent)
        if not writable(where):
            raise DiffMoEError(f"{option} '{path}' cannot be written: '{where}' is not writable "
                               f"by this user; choose another {option}")
    return planned
