"""File helpers written once: hashing a file, writing a file atomically, strict JSON, and
finding what an installed package ships."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

HASH_CHUNK = 1 << 20  # bytes read at a time when hashing a file


def hash_into(digest: "hashlib._Hash", path: str | Path) -> None:
    """Feed the bytes of ``path`` into a running ``digest``."""
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file, as hex."""
    digest = hashlib.sha256()
    hash_into(digest, path)
    return digest.hexdigest()


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as fh:
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], None], durable: bool = False) -> Path:
    """Write ``path`` through ``write(tmp)`` on a hidden temporary file beside it, then rename it
    into place, so that a reader never sees a partly written file (``durable``: fsync it first,
    for files that must survive a power loss). The temporary file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(tensors: dict, path: str | Path, metadata: Optional[dict] = None) -> Path:
    """``safetensors.torch.save_file``, the file then given the mode every other file gets
    (:func:`new_file_mode`): save_file creates it readable by its owner alone (0600), which on
    a shared filesystem hides weights beside a readable config."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata)
    os.chmod(path, new_file_mode())
    return Path(path)


def atomic_write_text(path: str | Path, text: str, durable: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), durable)


def to_json(value: Any, indent: Optional[int] = None) -> str:
    """``value`` as strict JSON: a NaN or an infinity anywhere in it raises ValueError instead
    of being written as the ``NaN``/``Infinity`` no JSON parser accepts. Every JSON the project
    writes goes through here (results put None with a reason where a number is undefined)."""
    return json.dumps(value, indent=indent, allow_nan=False)


def write_json(path: str | Path, value: Any, indent: int = 1) -> Path:
    """Write ``value`` to ``path`` as strict JSON (:func:`to_json`), atomically."""
    return atomic_write_text(path, to_json(value, indent))


def package_path(package: str, *relative: str,
                 check: Callable[[Path], bool] = Path.is_file) -> Optional[Path]:
    """The first of the ``relative`` paths (in that order) inside the installed package
    ``package`` for which ``check`` holds (by default: it is a file); None if the package is
    not installed or has none of them. The package is not imported."""
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    for location in (spec.submodule_search_locations or []) if spec else []:
        for rel in relative:
            path = Path(location) / rel
            if check(path):
                return path
    return None
