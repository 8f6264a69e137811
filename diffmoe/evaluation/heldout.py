"""The flow-matching loss on held-out images, measured the same way for every model.

A fixed set of test images, a fixed grid of times t and fixed noise (seeded): every model sees
exactly the same (image, t, noise) triples, so two models' losses differ only by the models, not by
the draw, and one number is cheap and has no sampling noise of its own. The loss is the training
objective's velocity MSE (``diffusion/flow.py``), averaged over the grid of t (midpoints of K equal
intervals of [0, 1]) and reported per t as well. Images are grouped in batches that share one t, as
in sampling, so a DiffMoE layer's pool holds one noise level, as it does when sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import ImageDataset, to_model_range
from ..diffusion import FlowMatching
from ..errors import ConfigError, DataError
from ..models import DiT
from ..models.moe import Routing


@dataclass
class HeldOutSet:
    """Images (N, C, H, W) in [-1, 1], their labels (N,), the times (K,) and the noise
    (K, N, C, H, W): one draw per (t, image)."""

    images: Tensor
    labels: Tensor
    times: Tensor
    noise: Tensor

    @classmethod
    def build(cls, dataset: ImageDataset, num: int, num_times: int, seed: int = 0
              ) -> "HeldOutSet":
        """The first ``num`` images of ``dataset``, ``num_times`` times at the midpoints of equal
        intervals of [0, 1], noise drawn with ``seed``."""
        if not 0 < num <= len(dataset) or num_times < 1:
            raise DataError(f"a held-out set needs 1..{len(dataset)} images and at least one "
                            f"time; got {num} images and {num_times} times")
        images = to_model_range(dataset.images[:num])
        times = (torch.arange(num_times, dtype=torch.float32) + 0.5) / num_times
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((num_times, *images.shape), generator=gen)
        return cls(images, dataset.labels[:num], times, noise)


@torch.no_grad()
def heldout_loss(model: DiT, objective: FlowMatching, data: HeldOutSet, routing: Routing,
                 batch_size: int) -> dict:
    """The velocity MSE of ``model`` (in eval mode, MoE layers routed by ``routing``) on every
    (image, t, noise) of ``data``, in batches of ``batch_size`` images at one t. Returns the mean
    over t (``loss``) and the loss at each t (``per_t``, with ``times``)."""
    if not isinstance(objective, FlowMatching):
        raise ConfigError("the held-out loss is defined for the flow objective; this model "
                          "was trained with DDPM")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_t = []
    try:
        for k, t in enumerate(data.times.tolist()):
            total = 0.0
            for start in range(0, data.images.shape[0], batch_size):
                x = data.images[start:start + batch_size].to(device)
                eps = data.noise[k, start:start + batch_size].to(device)
                tt = torch.full((x.shape[0],), t, device=device)
                out = model(objective.interpolate(x, eps, tt), objective.model_time(tt),
                            data.labels[start:start + batch_size].to(device), routing)
                err = objective.velocity(out.prediction).float() - objective.target(x, eps)
                total += float(err.pow(2).sum())
            per_t.append(total / data.images.numel())
    finally:
        model.train(was_training)
    if not all(map(torch.isfinite, torch.tensor(per_t))):
        raise DataError(f"the held-out loss is not finite ({per_t}); the model's weights are "
                        f"damaged")
    return {"loss": sum(per_t) / len(per_t), "per_t": per_t, "times": data.times.tolist()}
