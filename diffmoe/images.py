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
