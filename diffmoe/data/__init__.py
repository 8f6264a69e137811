from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from .captioned import attach_captions, build_captioned_dataset
from .datasets import ImageDataset, build_dataset, load_digits, load_mnist, to_model_range, to_uint8
from .folder import check_condition, open_folder
from .latents import LatentDataset, latent_decoder, read_index
from .loader import BatchIterator


def build_training_dataset(cfg) -> ImageDataset | LatentDataset:
    """The dataset ``cfg.data`` names: a packaged image set, a folder of the user's images, a
    latent cache, or a captioned set; for ``model.condition: text`` with its caption
    embeddings attached."""
    d = cfg.data
    if d.name == "latents":
        ds = LatentDataset.open(d.path, d.limit)
        check_condition(cfg.model.condition, bool(ds.captions), f"latent cache '{d.path}'")
    elif d.name == "folder":
        ds = open_folder(cfg)
    elif cfg.model.condition == "text":
        ds = build_captioned_dataset(d.name, d.split, d.limit)
    else:
        ds = build_dataset(d.name, d.split, d.limit)
    if isinstance(ds, ImageDataset):  # pixels (a latent cache holds its own flips)
        ds.flip = d.flip
    if cfg.model.condition == "text":
        attach_captions(cfg, ds)
    return ds


def sample_decoder(data: dict, device: torch.device | str
                   ) -> Optional[Callable[[Tensor], Tensor]]:
    """For a model trained on a latent cache (``data`` is the config's data section as a dict):
    a function decoding its samples to images with the VAE (``data.vae``, or the one the cache
    was encoded with). None for pixel-space models."""
    if data.get("name") != "latents":
        return None
    index = read_index(data["path"])
    return latent_decoder(data.get("vae") or index["vae"], index, device)


def decoded_size(data: dict, input_size: int) -> int:
    """Side of the images a model's samples become (latent side × the VAE's downsampling)."""
    if data.get("name") != "latents":
        return input_size
    return input_size * int(read_index(Path(data["path"])).get("downsampling", 1))


__all__ = ["BatchIterator", "ImageDataset", "LatentDataset", "build_dataset",
           "build_training_dataset", "decoded_size", "load_digits", "load_mnist",
           "sample_decoder", "to_model_range", "to_uint8"]
