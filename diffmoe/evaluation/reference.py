"""Reference feature sets for FID/KID/precision-recall, cached on disk.

A reference is named by a spec:

* ``DATASET[:SPLIT][:N]`` — the first N images of a packaged dataset split (``mnist:train:1000``,
  ``animal_mnist:all:1000``); N defaults to the number of generated samples;
* ``folder:DIR[:N]`` — N images of a folder of your own (class subfolders or a
  ``metadata.jsonl``, data/imagefolder.py), spread evenly over its sorted file list so that
  every class is represented (a file that does not decode is skipped, logged, and one not yet
  chosen takes its place), centre-cropped as for training to the generated images' side
  (``image_size``), grey if every one of them is grey; N defaults to the number of generated
  samples;
* a path to an ``.npz`` in the ADM evaluator's layout — either ``mu`` and ``sigma`` (the usual
  ImageNet reference statistics: FID only) or raw images ``arr_0`` (N, H, W, C) uint8.

Features of a dataset reference are cached as ``<cache>/fid/<dataset>-<split>-n<N>-<inception
id>.npz`` (mean, covariance and features), of a folder by a hash of its path and its files' names,
sizes and modification times (``folder-<hash>-n<N>-s<side>-<inception id>.npz``), and of an
``arr_0`` file by the file's hash, so a reference is pushed through the Inception once. The
cache directory is ``--cache-dir``, else ``$DIFFMOE_CACHE_DIR``, else for ``diffmoe eval`` of a
run's checkpoint the run's ``cache/`` (:func:`run_cache_dir`), else ``~/.cache/diffmoe``; where a
reference is computed, the log says where it will be cached. Cache files are written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..data import build_dataset
from ..data.folder import decode_first
from ..data.imagefolder import folder_channels, folder_modes, list_folder
from ..errors import DataError
from ..fileio import atomic_write, sha256_file, to_json
from ..paths import user_path
from .inception import FEATURE_DIM, batched, default_extractor, extract_features, inception_id
from .metrics import FeatureStats

log = logging.getLogger(__name__)

CACHE_ENV = "DIFFMOE_CACHE_DIR"
CACHE_FORMAT = 1
DEFAULT_SPLITS = {"animal_mnist": "all"}


def cache_dir(override: Optional[str | Path] = None) -> Path:
    if override:
        return Path(user_path(str(override)))
    env = os.environ.get(CACHE_ENV)
    return Path(user_path(env)) if env else Path.home() / ".cache" / "diffmoe"


def run_cache_dir(checkpoint: Path) -> Optional[Path]:
    """Where ``diffmoe eval`` of ``checkpoint`` caches reference statistics when neither
    ``--cache-dir`` nor ``$DIFFMOE_CACHE_DIR`` says: the ``cache/`` of the run the checkpoint
    belongs to (None for a checkpoint outside a run, or with the variable set)."""
    if os.environ.get(CACHE_ENV) or checkpoint.parent.name != "checkpoints":
        return None
    return checkpoint.parent.parent / "cache"


@dataclass
class Reference:
    stats: FeatureStats
    source: str  # what the spec resolved to, for the results file
    cache_file: Optional[str] = None
    cached: bool = False


def _file_hash(path: Path) -> str:
    return sha256_file(path)[:16]


def save_stats(stats: FeatureStats, path: Path, meta: dict) -> None:
    """Write mean, covariance, features and a JSON ``meta`` atomically (temp file + rename)."""
    arrays = {"mu": stats.mu.numpy(), "sigma": stats.sigma.numpy(),
              "num": np.array(stats.num), "meta": np.array(to_json(meta))}
    if stats.features is not None:
        arrays["features"] = stats.features.numpy()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write, durable=True)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"reference file {path} is not a readable .npz ({exc}); regenerate it or "
                        f"point --ref at another file") from None


def load_cached_stats(path: Path) -> Optional[FeatureStats]:
    """A cached statistics file, or None (with a warning) if it is unreadable: it is rebuilt."""
    try:
        data = _load_npz(path)
        meta = json.loads(str(data["meta"]))
        if meta.get("format") != CACHE_FORMAT:
            return None
        return FeatureStats(torch.from_numpy(data["mu"]), torch.from_numpy(data["sigma"]),
                            int(data["num"]), torch.from_numpy(data["features"]))
    except (DataError, KeyError, ValueError) as exc:
        log.warning("ignoring unreadable reference cache %s (%s); recomputing", path, exc)
        return None


def parse_dataset_spec(spec: str, default_num: int) -> tuple[str, str, int]:
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise DataError(f"reference '{spec}' is not DATASET[:SPLIT][:N] or an .npz path")
    name = parts[0]
    split = parts[1] if len(parts) > 1 and parts[1] else DEFAULT_SPLITS.get(name, "train")
    num = default_num
    if len(parts) == 3:
        try:
            num = int(parts[2])
        except ValueError:
            raise DataError(f"reference '{spec}': N '{parts[2]}' is not an integer") from None
    if num < 2:
        raise DataError(f"reference '{spec}': needs at least 2 images, got {num}")
    return name, split, num


def features_of_images(images_u8: torch.Tensor, batch_size: int, progress: bool,
                       desc: str, precision: str = "fp32",
                       device: torch.device | str = "cpu") -> FeatureStats:
    feats = extract_features(batched(images_u8, batch_size),
                             default_extractor(precision, device),
                             total=images_u8.shape[0], desc=desc, progress=progress)
    return FeatureStats.from_features(feats)


def _precision_tag(precision: str) -> str:
    """The cache-name part of a feature precision: none for the standard fp32."""
    return "" if precision == "fp32" else f"-{precision}"


def dataset_reference(spec: str, default_num: int, cache: Optional[str | Path] = None,
                      batch_size: int = 50, progress: bool = True,
                      precision: str = "fp32", device: torch.device | str = "cpu") -> Reference:
    """``precision``: the Inception's (:data:`inception.FEATURE_PRECISIONS`), part of the cache
    name; compare generated features of the same precision only. ``device``: where the
    Inception runs."""
    name, split, num = parse_dataset_spec(spec, default_num)
    ds = build_dataset(name, split)
    if num > len(ds):
        raise DataError(f"reference '{spec}' asks for {num} images but {name}:{split} has "
                        f"{len(ds)}")
    source = f"{name}:{split}:{num}"
    tag = _precision_tag(precision)
    path = cache_dir(cache) / "fid" / f"{name}-{split}-n{num}-{inception_id()}{tag}.npz"
    return _cached_or_computed(path, source + tag, lambda: ds.images[:num], batch_size,
                               progress, precision, device)


def _cached_or_computed(path: Path, source: str, images_nchw: Callable[[], torch.Tensor],
                        batch_size: int, progress: bool, precision: str = "fp32",
                        device: torch.device | str = "cpu") -> Reference:
    """The reference's features from the cache file if it is readable, else computed from
    ``images_nchw()`` (uint8) and cached."""
    if path.is_file():
        stats = load_cached_stats(path)
        if stats is not None:
            log.info("reference %s from cache %s", source, path)
            return Reference(stats, source, str(path), cached=True)
    log.info("reference %s: computing its Inception features, to be cached at %s (choose the "
             "place with --cache-dir or $%s)", source, path, CACHE_ENV)
    stats = features_of_images(images_nchw(), batch_size, progress, f"reference {source}",
                               precision, device)
    save_stats(stats, path, {"format": CACHE_FORMAT, "source": source,
                             "inception": inception_id(), "precision": precision})
    log.info("reference %s cached at %s", source, path)
    return Reference(stats, source, str(path))


def _check_shape(path: Path, key: str, array: np.ndarray, expected: tuple) -> None:
    if array.shape != expected:
        raise DataError(f"reference file {path}: '{key}' has shape {array.shape}, expected "
                        f"{expected} for {FEATURE_DIM}-d Inception pool3 statistics")


def npz_reference(path: Path, cache: Optional[str | Path] = None, batch_size: int = 50,
                  progress: bool = True, precision: str = "fp32",
                  device: torch.device | str = "cpu") -> Reference:
    """An ADM-style reference batch: its statistics as they are, or the features of its images
    (``precision`` and ``device`` as for :func:`dataset_reference`)."""
    if path.is_dir():
        raise DataError(f"reference file {path} is a directory; pass an .npz file (or "
                        f"DATASET[:SPLIT][:N])")
    if not path.is_file():
        raise DataError(f"reference file {path} does not exist")
    data = _load_npz(path)
    if "mu" in data and "sigma" in data:
        _check_shape(path, "mu", data["mu"], (FEATURE_DIM,))
        _check_shape(path, "sigma", data["sigma"], (FEATURE_DIM, FEATURE_DIM))
        num = int(data["num"]) if "num" in data else None
        features = torch.from_numpy(data["features"]) if "features" in data else None
        stats = FeatureStats(torch.from_numpy(data["mu"]).double(),
                             torch.from_numpy(data["sigma"]).double(), num, features)
        return Reference(stats, f"statistics {path}")
    if "arr_0" not in data:
        raise DataError(f"reference file {path} has neither 'mu'/'sigma' nor 'arr_0' images "
                        f"(keys: {sorted(data)}); use an ADM-style reference batch")
    images = data["arr_0"]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise DataError(f"reference file {path}: 'arr_0' must be uint8 images (N, H, W, 1 or 3) "
                        f"as the ADM evaluator writes them; got {images.dtype} {images.shape}")
    tag = _precision_tag(precision)
    source = f"images {path} ({images.shape[0]}){tag}"
    cache_file = cache_dir(cache) / "fid" / f"npz-{_file_hash(path)}-{inception_id()}{tag}.npz"
    return _cached_or_computed(cache_file, source,
                               lambda: torch.from_numpy(images).permute(0, 3, 1, 2),
                               batch_size, progress, precision, device)


FOLDER_PREFIX = "folder:"


def parse_folder_spec(spec: str, default_num: int) -> tuple[Path, int]:
    """``folder:DIR[:N]`` → (DIR, N); a DIR holding ':' is read whole unless it ends in ':N'."""
    rest = spec[len(FOLDER_PREFIX):]
    head, _, tail = rest.rpartition(":")
    head, rest = user_path(head), user_path(rest)
    root, num = (Path(head), int(tail)) if head and tail.isdigit() else (Path(rest), default_num)
    if not rest:
        raise DataError(f"reference '{spec}' names no folder; write folder:DIR[:N]")
    if num < 2:
        raise DataError(f"reference '{spec}': needs at least 2 images, got {num}")
    return root, num


def folder_reference(spec: str, default_num: int, image_size: int,
                     cache: Optional[str | Path] = None, batch_size: int = 50,
                     progress: bool = True, precision: str = "fp32",
                     device: torch.device | str = "cpu") -> Reference:
    root, num = parse_folder_spec(spec, default_num)
    listing = list_folder(root)
    if num > len(listing):
        raise DataError(f"reference '{spec}' asks for {num} images but '{root}' has "
                        f"{len(listing)}; ask for at most {len(listing)} (folder:DIR:N, or a "
                        f"smaller --num)")
    spread = [i * len(listing) // num for i in range(num)]
    order = spread + sorted(set(range(len(listing))) - set(spread))  # the rest stand in
    tag = _precision_tag(precision)
    source = f"folder {root}:{num} at {image_size}x{image_size}{tag}"
    key = listing.fingerprint(size=image_size)[:16]
    path = (cache_dir(cache) / "fid"
            / f"folder-{key}-n{num}-s{image_size}-{inception_id()}{tag}.npz")

    def images() -> torch.Tensor:
        channels = folder_channels(folder_modes(listing.subset(spread)))
        return decode_first(listing, order, num, image_size, channels, progress)

    return _cached_or_computed(path, source, images, batch_size, progress, precision, device)


def is_file_reference(spec: str) -> bool:
    """Whether ``spec`` names an .npz file (whose features are known only once it is read), not
    a dataset or a folder (which always have features)."""
    return not spec.startswith(FOLDER_PREFIX) and (
        spec.endswith(".npz") or Path(user_path(spec)).is_file())


def load_reference(spec: str, default_num: int, cache: Optional[str | Path] = None,
                   batch_size: int = 50, progress: bool = True,
                   image_size: Optional[int] = None, precision: str = "fp32",
                   device: torch.device | str = "cpu") -> Reference:
    """The reference ``spec`` names; ``image_size`` is the side a folder's images are cropped
    to (that of the generated images); the Inception runs on ``device`` in ``precision``."""
    if spec.startswith(FOLDER_PREFIX):
        if image_size is None:
            raise DataError(f"reference '{spec}': a folder reference needs the side to crop its "
                            f"images to")
        return folder_reference(spec, default_num, image_size, cache, batch_size, progress,
                                precision, device)
    if is_file_reference(spec):
        return npz_reference(Path(user_path(spec)), cache, batch_size, progress, precision,
                             device)
    return dataset_reference(spec, default_num, cache, batch_size, progress, precision, device)
