"""A deterministic, resumable, rank-sharded batch iterator over an in-memory dataset.

Each epoch draws one permutation from ``seed + epoch``; rank r of W takes every W-th index of it.
The iterator's whole state is (epoch, position), so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DataError
from .datasets import ImageDataset, to_model_range


@dataclass
class LoaderState:
    epoch: int = 0
    position: int = 0  # batches already taken in this epoch


class BatchIterator:
    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu"):
        per_rank = len(dataset) // world_size
        if per_rank < batch_size:
            raise DataError(
                f"dataset '{dataset.name}' has {len(dataset)} images, fewer than one batch of "
                f"{batch_size} per rank x {world_size} ranks; lower train.batch_size or use more "
                f"data")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.batches_per_epoch = per_rank // batch_size
        self.state = LoaderState()
        self._perm: Tensor | None = None
        self._perm_epoch = -1

    def _permutation(self) -> Tensor:
        if self._perm_epoch != self.state.epoch:
            g = torch.Generator().manual_seed(self.seed + self.state.epoch)
            perm = torch.randperm(len(self.dataset), generator=g)
            self._perm = perm[self.rank::self.world_size]
            self._perm_epoch = self.state.epoch
        return self._perm

    def next(self) -> tuple[Tensor, Tensor]:
        if self.state.position >= self.batches_per_epoch:
            self.state = LoaderState(self.state.epoch + 1, 0)
        start = self.state.position * self.batch_size
        idx = self._permutation()[start:start + self.batch_size]
        self.state = LoaderState(self.state.epoch, self.state.position + 1)
        x = to_model_range(self.dataset.images[idx]).to(self.device, non_blocking=True)
        y = self.dataset.conditions(idx).to(self.device, non_blocking=True)
        return x, y

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "position": self.state.position}

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState(int(state["epoch"]), int(state["position"]))
