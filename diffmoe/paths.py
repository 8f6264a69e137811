"""Checks on paths the user names for output, so that a wrong one fails with one clear line
before any work is done."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from .errors import DiffMoEError


def file_in_the_way(path: Path) -> Optional[Path]:
    """The nearest existing ``path`` or ancestor of it that is not a directory (so nothing can be
    created at ``path``), or None."""
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


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
