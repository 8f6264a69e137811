"""A tiny randomly initialised diffusers AutoencoderKL, saved as a VAE folder: what the latent
tests encode and decode with (no VAE weights can be downloaded here; random ones are enough for
the plumbing)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_vae(path: Path, latent_channels: int = 4, levels: int = 2, image_size: int = 16,
                  seed: int = 0) -> Path:
    """An AutoencoderKL that downsamples by 2**(levels-1), with ``latent_channels`` channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    widths = (8, 16, 16, 16)[:levels]
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                  down_block_types=("DownEncoderBlock2D",) * levels,
                  up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=widths,
                  layers_per_block=1, norm_num_groups=4, sample_size=image_size
                  ).save_pretrained(path)
    return path
