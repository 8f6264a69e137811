"""Checks on paths the user names for output, so that a wrong one fails with one clear line
before any work is done."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def file_in_the_way(path: Path) -> Optional[Path]:
    """The nearest existing ``path`` or ancestor of it that is not a directory (so nothing can be
    created at ``path``), or None."""
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None
