"""``data.name: folder``: training in pixel space on a folder of your own images.

``data.path`` is a folder in one of the layouts of imagefolder.py (class subfolders, or a
``metadata.jsonl`` of captions for ``model.condition: text``). Every image is centre-cropped to
``model.input_size`` as ADM does, with ``model.in_channels`` channels: 1 for a folder of grey
images, 3 for colour (RGB, RGBA composited on white, palette); a mismatch is refused before any
image is decoded, from the images' headers. (``data.flip``, each training image or its mirror at
random, is applied by the dataset's batches: datasets.py.)

Where the images live:

* a folder whose decoded images take at most ``data.in_memory_mb`` MB (images × channels × side²
  bytes) is decoded into memory at every start;
* a larger one is converted once into ``data.cache_dir/folder-<key>/``, ``key`` a SHA-256 of the
  folder's path, every file's name, size and modification time, the labels and the settings (side,
  channels), so a changed folder or setting makes a new cache and never reads a stale one. The
  conversion shows a progress bar, decodes with ``data.workers`` processes, and records each
  chunk of :data:`CHUNK` images when its pixels are on disk, so an interrupted conversion
  continues where it stopped. Training reads the cache memory-mapped. Layout::

      source.json        what the cache was made from (for people; the key is the name)
      images.npy         (N, C, S, S) uint8, one row per listed file, in listing order
      chunk_00000.json   written when the chunk's rows are on disk: its skipped files
      kept.npy           the rows of the images that decoded (int64)
      skipped.txt        every file that could not be decoded, with the reason
      index.json         written last: the conversion is finished

Files that cannot be decoded are left out, listed (a warning, and skipped.txt for a cache).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ..config import Config
from ..errors import DataError
from ..fileio import atomic_write, to_json, write_json
from ..paths import DirectoryLock, LockHeld, NotALockFile
from .captioned import CaptionedDataset
from .datasets import ImageDataset
from .imagefolder import (
    METADATA,
    Decoder,
    FolderListing,
    folder_modes,
    is_grey,
    list_folder,
    map_grouped,
    report_skipped,
)

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # part of the key: bump when the stored pixels would change
CHUNK = 1024  # images decoded between two records of a conversion (the unit of resumption)
DECODE_BATCH = 64  # images per decoding task handed to a worker
MB = 2 ** 20
LOCK = "convert.lock"
WAIT_S = 2.0  # how often a process waiting for another's conversion looks again
INDEX = "index.json"


# -- checks -----------------------------------------------------------------------------------

def check_condition(condition: str, captioned: bool, where: str) -> None:
    """Captions for a text model, classes for a class model: one line otherwise."""
    if condition == "class" and captioned:
        raise DataError(f"{where} holds captions, not class labels; set model.condition=text")
    if condition == "text" and not captioned:
        raise DataError(f"model.condition=text needs captions, but {where} has class labels; "
                        f"caption its images in {METADATA} ({{\"file_name\": ..., \"text\": "
                        f"...}} per line) or set model.condition=class")


def check_channels(listing: FolderListing, modes: list[Optional[str]], channels: int) -> None:
    """A grey folder trains a 1-channel model, a colour one a 3-channel model."""
    where = f"data.path '{listing.root}'"
    if all(m is None for m in modes):
        return  # no header could be read: decoding lists every file
    if channels == 1:
        colour = next((i for i, m in enumerate(modes) if m is not None and not is_grey(m)), None)
        if colour is not None:
            raise DataError(f"{where} holds colour images (e.g. '{listing.files[colour]}', "
                            f"{modes[colour]}) but model.in_channels=1; set model.in_channels=3")
    elif all(m is None or is_grey(m) for m in modes):
        raise DataError(f"{where} holds only grey images but model.in_channels={channels}; set "
                        f"model.in_channels=1")


# -- decoding -------------------------------------------------------------------------------

def decode_rows(listing: FolderListing, target: np.ndarray, chunks: dict[int, list[int]],
                size: int, channels: int, workers: int, progress: bool, on_chunk=None
                ) -> tuple[list[int], list[str]]:
    """Decode the files of ``chunks`` (a number → file indices) into those rows of ``target``
    (N, C, S, S); ``on_chunk(number, skipped rows, skipped lines)`` as each chunk completes.
    Returns the rows of the files that could not be decoded and the files, as
    'PATH<TAB>reason'."""
    total = sum(len(v) for v in chunks.values())
    skipped_rows: list[int] = []
    skipped: list[str] = []
    rows: dict[int, list[int]] = {c: [] for c in chunks}
    lines: dict[int, list[str]] = {c: [] for c in chunks}
    with tqdm(total=total, desc=f"decode {listing.root}", disable=not progress,
              dynamic_ncols=True, unit="img") as bar:
        for chunk, items, last in map_grouped(listing.files, Decoder(size, channels), chunks,
                                              DECODE_BATCH, workers):
            for i, pixels, failure in items:
                if failure:
                    rows[chunk].append(i)
                    lines[chunk].append(failure)
                else:
                    target[i] = pixels.transpose(2, 0, 1)
            bar.update(len(items))
            if last:
                skipped_rows += rows[chunk]
                skipped += lines[chunk]
                if on_chunk is not None:
                    on_chunk(chunk, rows[chunk], lines[chunk])
    return skipped_rows, skipped


def decode_folder(listing: FolderListing, size: int, channels: int, workers: int = 0,
                  progress: bool = False) -> tuple[Tensor, np.ndarray]:
    """Every image of ``listing`` decoded into memory, (M, C, S, S) uint8, and the indices of
    the M that decoded (the others are skipped and logged)."""
    array = np.zeros((len(listing), channels, size, size), dtype=np.uint8)
    bad, skipped = decode_rows(listing, array, {0: list(range(len(listing)))}, size, channels,
                               workers, progress)
    report_skipped(skipped)
    kept = _kept(len(listing), bad)
    _require_some(kept, listing, "listed in the warning above")
    return torch.from_numpy(array[kept]), kept


def decode_first(listing: FolderListing, order: list[int], num: int, size: int,
                 channels: int, progress: bool = False) -> Tensor:
    """The first ``num`` images of ``listing`` in ``order`` that decode, (num, C, S, S) uint8:
    the files that do not are skipped, logged, and the next ones taken in their place."""
    parts: list[np.ndarray] = []
    skipped: list[str] = []
    have = start = 0
    while have < num and start < len(order):
        take = listing.subset(order[start:start + num - have])
        array = np.zeros((len(take), channels, size, size), dtype=np.uint8)
        bad, lines = decode_rows(take, array, {0: list(range(len(take)))}, size, channels, 0,
                                 progress)
        parts.append(array[_kept(len(take), bad)])
        skipped += lines
        have += len(parts[-1])
        start += len(take)
    report_skipped(skipped)
    _require_some(np.arange(have), listing, "listed in the warning above")
    return torch.from_numpy(np.concatenate(parts))


def _kept(num: int, bad_rows) -> np.ndarray:
    bad = set(bad_rows)
    return np.asarray([i for i in range(num) if i not in bad], dtype=np.int64)


def _require_some(kept: np.ndarray, listing: FolderListing, listed: str) -> None:
    if len(kept) == 0:
        raise DataError(f"none of the {len(listing)} images in '{listing.root}' could be "
                        f"decoded ({listed}); check that they are images")


# -- the cache --------------------------------------------------------------------------------

class MappedImages:
    """Rows ``kept`` of a memory-mapped (N, C, S, S) uint8 array, indexed like a tensor of the
    kept images."""

    def __init__(self, array: np.ndarray, kept: np.ndarray):
        self.array, self.kept = array, kept

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.kept), *self.array.shape[1:])

    def __getitem__(self, idx) -> Tensor:
        rows = self.kept[np.arange(len(self.kept))[idx] if isinstance(idx, slice)
                         else np.asarray(idx)]
        order = np.argsort(rows, kind="stable")  # sorted reads from the memory map
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=np.uint8)
        out[order] = self.array[rows[order]]
        return torch.from_numpy(out)


def cache_folder(listing: FolderListing, size: int, channels: int, cache_dir: str | Path,
                 workers: int = 0, progress: bool = True) -> tuple[MappedImages, np.ndarray]:
    """The folder's images from its cache in ``cache_dir``, converting (or finishing) it first
    if needed; one process converts while any other waits for it."""
    key = listing.fingerprint(size=size, channels=channels, version=CACHE_VERSION)
    where = Path(cache_dir) / f"folder-{key[:24]}"
    if not (where / INDEX).is_file():
        where.mkdir(parents=True, exist_ok=True)
        with _conversion_lock(where):
            if not (where / INDEX).is_file():
                convert(listing, where, size, channels, workers, progress)
    kept = np.load(where / "kept.npy")
    _require_some(kept, listing, f"listed in {where / 'skipped.txt'}")
    images = np.load(where / "images.npy", mmap_mode="r")
    log.info("folder %s: %d images from the cache %s", listing.root, len(kept), where)
    return MappedImages(images, kept), kept


@contextmanager
def _conversion_lock(where: Path) -> Iterator[None]:
    lock = DirectoryLock(where / LOCK)
    waiting = False
    while True:
        try:
            lock.acquire()
            break
        except LockHeld as held:
            if not waiting:
                log.info("waiting for %s, which is converting the images into %s", held.holder,
                         where)
                waiting = True
            time.sleep(WAIT_S)
        except NotALockFile:
            raise DataError(f"'{where / LOCK}' is not a diffmoe lock file; move it away "
                            f"(the folder cache keeps its lock there)") from None
    try:
        yield
    finally:
        lock.release()


def _chunk_file(where: Path, chunk: int) -> Path:
    return where / f"chunk_{chunk:05d}.json"


def convert(listing: FolderListing, where: Path, size: int, channels: int, workers: int,
            progress: bool) -> None:
    """Decode the folder into ``where`` (or finish an interrupted conversion there)."""
    num_chunks = -(-len(listing) // CHUNK)
    todo = [c for c in range(num_chunks) if not _chunk_file(where, c).is_file()]
    if len(todo) == num_chunks:  # a new conversion: check the channels first
        check_channels(listing, folder_modes(listing, workers, progress=progress), channels)
    else:
        log.info("continuing the conversion in %s: %d of %d chunks done", where,
                 num_chunks - len(todo), num_chunks)
    shape = (len(listing), channels, size, size)
    write_json(where / "source.json", {"source": str(listing.root.resolve()), "shape": shape,
                                       "files": len(listing), "version": CACHE_VERSION})
    images = where / "images.npy"
    if not images.is_file():
        atomic_write(images, lambda tmp: _allocate(tmp, shape))
    target = np.load(images, mmap_mode="r+")

    def record(chunk: int, rows: list[int], lines: list[str]) -> None:
        target.flush()
        atomic_write(_chunk_file(where, chunk),
                     lambda tmp: tmp.write_text(to_json({"rows": rows, "skipped": lines})),
                     durable=True)

    chunks = {c: list(range(c * CHUNK, min(len(listing), (c + 1) * CHUNK))) for c in todo}
    decode_rows(listing, target, chunks, size, channels, workers, progress, record)
    records = [json.loads(_chunk_file(where, c).read_text()) for c in range(num_chunks)]
    kept = _kept(len(listing), [r for rec in records for r in rec["rows"]])
    atomic_write(where / "kept.npy", lambda tmp: _save(tmp, kept))
    skipped = [line for rec in records for line in rec["skipped"]]
    report_skipped(skipped, where / "skipped.txt")
    write_json(where / INDEX, {"kept": len(kept), "skipped": len(skipped), "shape": shape})
    log.info("converted %d images of %s into %s", len(kept), listing.root, where)


def _allocate(path: Path, shape: tuple[int, ...]) -> None:
    """A zero (N, C, S, S) uint8 .npy of that shape (sparse on disk until written)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    array.flush()
    del array


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array)


# -- the dataset ------------------------------------------------------------------------------

def open_folder(cfg: Config, progress: bool = True) -> ImageDataset:
    """The training dataset of ``data.name: folder``: class labels, or (for a metadata.jsonl)
    a :class:`CaptionedDataset` whose caption embeddings are still to be attached."""
    d, m = cfg.data, cfg.model
    listing = list_folder(d.path)
    check_condition(m.condition, listing.captioned, f"data.path '{d.path}'")
    if d.limit and d.limit < len(listing):
        listing = listing.subset(range(d.limit))
    classes = len(set(listing.labels))
    if m.condition == "class" and classes != m.num_classes:  # sampling draws 0..num_classes-1
        raise DataError(f"data.path '{d.path}' has {classes} class{'es' * (classes != 1)}"
                        f"{' within data.limit' if d.limit else ''} but model.num_classes="
                        f"{m.num_classes}; set model.num_classes={classes}")
    size, channels = m.input_size, m.in_channels
    if len(listing) * channels * size * size <= d.in_memory_mb * MB:
        check_channels(listing, folder_modes(listing, d.workers), channels)
        images, kept = decode_folder(listing, size, channels, d.workers, progress)
        log.info("folder %s: %d images decoded into memory", listing.root, len(kept))
    else:
        images, kept = cache_folder(listing, size, channels, d.cache_dir, d.workers, progress)
    labels = torch.tensor(listing.labels, dtype=torch.int64)[torch.from_numpy(kept)]
    if listing.captioned:
        return CaptionedDataset(images, labels, len(listing.captions), "folder",
                                contents=listing.contents(), captions=listing.captions)
    # The classes of the images listed (data.limit takes the first classes' images).
    return ImageDataset(images, labels, classes, "folder", contents=listing.contents(),
                        class_names=tuple(listing.classes[:classes]))
