"""Folders of the user's own images: listing them, the ADM centre crop, and decoding them in
worker processes. Used by ``data.name: folder`` (folder.py), ``diffmoe cache-latents``
(latents.py) and ``--ref folder:DIR`` FID references.

A folder is one of two layouts:

* ``DIR/<class>/<image>``: class-conditional, classes numbered in sorted folder order (the
  ImageNet layout). The classes of a folder are its subfolders that are not hidden (a name
  starting with ``.``, such as Jupyter's ``.ipynb_checkpoints``); hidden files are no images of
  it either; a class subfolder without images is an error naming it;
* ``DIR/metadata.jsonl``, one ``{"file_name": "a.png", "text": "a caption"}`` per line with
  ``file_name`` relative to DIR (the diffusers imagefolder convention): text-to-image. Each
  distinct caption is stored once and the images' labels index them.

Every image becomes a ``size``×``size`` uint8 array with 1 (grey) or 3 (RGB) channels: alpha is
composited on white, 16-bit grey scaled to 8 bits, then the ADM centre crop (:func:`center_crop`).
Files that cannot be decoded are left out and listed, never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..config.schema import quote
from ..errors import DataError
from ..fileio import to_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
METADATA = "metadata.jsonl"
BACKGROUND = 255  # what transparent pixels become: white
GREY_MODES = ("1", "L", "LA", "La", "I", "F")  # and every "I;16..." mode
CHANNELS = (1, 3)  # grey, RGB
# What decoding a damaged or foreign file raises; such a file is skipped and listed.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError,
                 Image.DecompressionBombError)
SKIPPED_SHOWN = 5  # skipped files named in the log line (all of them go to skipped.txt)


@dataclass
class FolderListing:
    """The images of a folder, sorted, with a label each: a class index (``classes``) or the
    index of its caption in ``captions`` (distinct captions, sorted)."""

    root: Path
    files: list[Path]
    labels: list[int]
    classes: list[str]
    captions: list[str]

    @property
    def captioned(self) -> bool:
        return bool(self.captions)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: Sequence[int]) -> "FolderListing":
        return replace(self, files=[self.files[i] for i in indices],
                       labels=[self.labels[i] for i in indices])

    def fingerprint(self, **settings) -> str:
        """SHA-256 (hex) of the folder's path, every file's name, size and modification time,
        the labels with their class names or captions, and ``settings``: a cache keyed by it is
        never stale (a changed file or setting gives another key)."""
        h = hashlib.sha256(to_json({"root": str(self.root.resolve()), "classes": self.classes,
                                    "captions": self.captions, "settings": settings}).encode())
        for path, label in zip(self.files, self.labels):
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
        return h.hexdigest()

    def contents(self) -> str:
        """SHA-256 (hex) of which images the listing holds: each file's path relative to the
        folder, its size and its class or caption; the same wherever the folder lies and
        whenever its files were copied, so that it tells whether a run's data changed."""
        names = self.captions or self.classes
        h = hashlib.sha256()
        for path, label in zip(self.files, self.labels):
            h.update(f"{path.relative_to(self.root)}\0{path.stat().st_size}\0{names[label]}\n"
                     .encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def is_hidden(path: Path) -> bool:
    """A name starting with ``.``: no class and no image of a folder."""
    return path.name.startswith(".")


def layout_help(folder: Path) -> str:
    return (f"put each class's images in a subfolder of it ('{folder}/<class>/<image>', the "
            f"ImageNet layout) or caption them in '{folder / METADATA}'")


def list_folder(folder: str | Path) -> FolderListing:
    """The images of ``folder``: captioned if it holds metadata.jsonl, else by class subfolder."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise DataError(f"image folder '{folder}' {what}; pass a directory of images and "
                        f"{layout_help(folder)}")
    if (folder / METADATA).is_file():
        return _captioned_listing(folder)
    return _class_listing(folder)


def _class_listing(folder: Path) -> FolderListing:
    visible = [p for p in folder.iterdir() if not is_hidden(p)]
    classes = sorted(p.name for p in visible if p.is_dir())
    if not classes:
        hidden = sorted(p.name for p in folder.iterdir() if is_hidden(p))
        state = (f"has no class subfolders and no {METADATA}" if visible else
                 f"holds only hidden entries (e.g. '{hidden[0]}')" if hidden else "is empty")
        raise DataError(f"image folder '{folder}' {state}; {layout_help(folder)}")
    images = {name: [p for p in sorted((folder / name).iterdir())
                     if p.is_file() and not is_hidden(p) and p.suffix.lower() in IMAGE_SUFFIXES]
              for name in classes}
    empty = [name for name in classes if not images[name]]
    if len(empty) == len(classes):
        raise DataError(f"image folder '{folder}' has no images ({', '.join(IMAGE_SUFFIXES)}) in "
                        f"its class subfolders")
    if empty:
        shown = ", ".join(f"'{name}'" for name in empty[:SKIPPED_SHOWN])
        more = f" and {len(empty) - SKIPPED_SHOWN} more" if len(empty) > SKIPPED_SHOWN else ""
        raise DataError(f"image folder '{folder}' has class subfolders without images ({shown}"
                        f"{more}): a class with no images can be neither trained nor sampled; "
                        f"put images in them or move them out of '{folder}'")
    pairs = [(p, label) for label, name in enumerate(classes) for p in images[name]]
    return FolderListing(folder, [p for p, _ in pairs], [y for _, y in pairs], classes, [])


def _captioned_listing(folder: Path) -> FolderListing:
    """The images and captions of ``folder/metadata.jsonl``, in the file's order."""
    path = folder / METADATA
    form = '{"file_name": "a.png", "text": "a caption"}'
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"'{path}' is not UTF-8 text; write one {form} per line") from None
    files, texts = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"'{path}' line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{where} is not JSON; write one {form} per line") from None
        row = row if isinstance(row, dict) else {}
        name, text = row.get("file_name"), row.get("text")
        if not isinstance(name, str) or not name or not isinstance(text, str) or not text.strip():
            raise DataError(f"{where} needs a non-empty \"file_name\" and \"text\"; write one "
                            f"{form} per line")
        if Path(name).is_absolute() or os.path.normpath(name).split(os.sep)[0] == "..":
            raise DataError(f"{where} names {quote(name)}, which lies outside '{folder}'; name "
                            f"each image by its path inside the folder, e.g. \"a.png\" or "
                            f"\"cats/a.png\"")
        file = folder / name
        if not file.is_file():
            raise DataError(f"{where} names '{name}', which is not a file in '{folder}'; fix the "
                            f"line or add the image")
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{where} names '{name}', which is not an image "
                            f"({', '.join(IMAGE_SUFFIXES)})")
        files.append(file)
        texts.append(text.strip())
    if not files:
        raise DataError(f"'{path}' lists no images; write one {form} per line")
    captions = sorted(set(texts))
    index = {c: i for i, c in enumerate(captions)}
    return FolderListing(folder, files, [index[t] for t in texts], [], captions)


# -- one image ------------------------------------------------------------------------------

def is_grey(mode: str) -> bool:
    """Whether a PIL mode holds grey levels only (palette images count as colour)."""
    return mode in GREY_MODES or mode.startswith("I;16")


def to_mode(image: Image.Image, channels: int = 3) -> Image.Image:
    """``image`` as 8-bit grey (``channels`` 1) or RGB (3): transparency composited on white,
    16-bit grey scaled to 8 bits."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        high = np.asarray(image).astype(np.uint32) >> 8
        image = Image.fromarray(np.minimum(high, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (BACKGROUND,) * 4)
        image.alpha_composite(rgba)
    return image.convert("L" if channels == 1 else "RGB")


def center_crop(image: Image.Image, size: int, channels: int = 3) -> np.ndarray:
    """ADM's center crop of a PIL image to ``size``×``size``: halve with a box filter while the
    short side is at least twice the target, resize the short side to it with bicubic, crop the
    centre. A uint8 (size, size, channels) array (:func:`to_mode` gives the channels)."""
    image = to_mode(image, channels)
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(d // 2 for d in image.size), resample=Image.BOX)
    ratio = size / min(image.size)
    image = image.resize(tuple(round(d * ratio) for d in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image).reshape(image.size[1], image.size[0], channels)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size].copy()  # its own, writable memory


def load_image(path: Path, size: int, channels: int = 3) -> np.ndarray:
    """The file's centre crop (raises one of :data:`DECODE_ERRORS` for a damaged file)."""
    with Image.open(path) as image:
        return center_crop(image, size, channels)


def image_mode(path: Path) -> str:
    """The PIL mode in the file's header (the pixels are not decoded)."""
    with Image.open(path) as image:
        return image.mode


# -- many images, in worker processes ----------------------------------------------------------

def _attempt(fn: Callable, path: Path) -> tuple[object, Optional[str]]:
    try:
        return fn(path), None
    except DECODE_ERRORS as exc:
        return None, f"{path}\t{type(exc).__name__}: {exc}"


class _FileJob:
    """A map-style torch dataset: item i is (i, fn(file i) or None, the failure or None)."""

    def __init__(self, files: Sequence[Path], fn: Callable):
        self.files, self.fn = files, fn

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, object, Optional[str]]:
        return (i, *_attempt(self.fn, self.files[i]))


def _as_list(items: list) -> list:
    return items


def map_files(files: Sequence[Path], fn: Callable, batches: Sequence[Sequence[int]],
              workers: int = 0) -> Iterator[list[tuple[int, object, Optional[str]]]]:
    """``fn`` (picklable) on the files of each batch of indices, in the order of ``batches``,
    by ``workers`` processes (0: this one). Yields per batch a list of (index, result or None,
    the failure as 'PATH<TAB>reason' or None); the order, and so everything computed from it,
    is the same for any number of workers."""
    from torch.utils.data import DataLoader

    if workers < 0:
        raise DataError(f"--workers {workers} must be >= 0 (0 decodes in the main process)")
    loader = DataLoader(_FileJob(files, fn), batch_sampler=batches, num_workers=workers,
                        collate_fn=_as_list)
    yield from loader


def map_grouped(files: Sequence[Path], fn: Callable, groups: dict[int, list[int]],
                batch_size: int, workers: int = 0
                ) -> Iterator[tuple[int, list[tuple[int, object, Optional[str]]], bool]]:
    """:func:`map_files` over the files of each group (a number → file indices), in batches of
    at most ``batch_size`` that never straddle two groups: yields (group, the batch's items,
    whether it is the group's last batch)."""
    batches, owners = [], []
    for group, indices in groups.items():
        for batch in chunked(indices, batch_size):
            batches.append(batch)
            owners.append(group)
    for k, items in enumerate(map_files(files, fn, batches, workers)):
        yield owners[k], items, k + 1 == len(owners) or owners[k + 1] != owners[k]


class Decoder:
    """The picklable :func:`load_image` of one size and channel count."""

    def __init__(self, size: int, channels: int):
        self.size, self.channels = size, channels

    def __call__(self, path: Path) -> np.ndarray:
        return load_image(path, self.size, self.channels)


def chunked(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i:i + size]) for i in range(0, len(indices), size)]


def folder_modes(listing: FolderListing, workers: int = 0, batch: int = 256,
                 progress: bool = False) -> list[Optional[str]]:
    """Each file's PIL mode from its header (None where it cannot be read: decoding will skip
    and list that file)."""
    from tqdm import tqdm

    modes: list[Optional[str]] = [None] * len(listing)
    with tqdm(total=len(listing), desc="read image headers", disable=not progress,
              dynamic_ncols=True) as bar:
        for items in map_files(listing.files, image_mode, chunked(range(len(listing)), batch),
                               workers):
            for i, mode, _ in items:
                modes[i] = mode
            bar.update(len(items))
    return modes


def folder_channels(modes: Sequence[Optional[str]]) -> int:
    """1 if every readable image is grey, else 3."""
    return 1 if all(m is None or is_grey(m) for m in modes) else 3


def report_skipped(skipped: list[str], listed_in: Optional[Path] = None) -> None:
    """Warn about the files that could not be decoded (and write them to ``listed_in``)."""
    if listed_in is not None:
        listed_in.write_text("".join(line + "\n" for line in skipped))
    if not skipped:
        return
    shown = "; ".join(s.replace("\t", " (", 1) + ")" for s in skipped[:SKIPPED_SHOWN])
    more = f" and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
    where = f"; they are listed in {listed_in}" if listed_in is not None else ""
    log.warning("%d image(s) could not be decoded and were left out%s: %s%s", len(skipped),
                where, shown, more)
