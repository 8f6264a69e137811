"""Writing image grids as PNG (atomically: a half-written file never replaces a good one)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.datasets import to_uint8
from .fileio import atomic_write

GRID_PAD = 2  # pixels between tiles
GRID_COLUMNS = 10  # class-conditional grids: one class per column


def grid_classes(num_classes: int, seed: int) -> list[int]:
    """The classes of a class-conditional grid's columns: every class of a model with at most
    :data:`GRID_COLUMNS`, else one class drawn (with ``seed``) from each of ``GRID_COLUMNS``
    equal stretches of 0..num_classes-1, in order, so that the grid of an ImageNet model shows
    classes from the whole range rather than 0..9."""
    if num_classes <= GRID_COLUMNS:
        return list(range(num_classes))
    edges = [num_classes * i // GRID_COLUMNS for i in range(GRID_COLUMNS + 1)]
    gen = torch.Generator().manual_seed(seed)
    return [lo + int(torch.randint(hi - lo, (), generator=gen))
            for lo, hi in zip(edges, edges[1:])]


def make_grid(images: torch.Tensor, nrow: int | None = None, upscale: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → an (rows·H, nrow·W[, 3]) uint8 array with padding between tiles."""
    x = to_uint8(images).cpu()
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + GRID_PAD) + GRID_PAD, nrow * (w + GRID_PAD) + GRID_PAD,
                       dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = GRID_PAD + r * (h + GRID_PAD), GRID_PAD + col * (w + GRID_PAD)
        grid[:, top:top + h, left:left + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    arr = arr[..., 0] if c == 1 else arr
    if upscale > 1:
        arr = np.kron(arr, np.ones((upscale, upscale) + (1,) * (arr.ndim - 2), dtype=np.uint8))
    return arr


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
              upscale: int = 1) -> Path:
    grid = Image.fromarray(make_grid(images, nrow, upscale))
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
