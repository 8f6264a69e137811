from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import DataError
from .captioned import attach_captions, build_captioned_dataset
from .datasets import ImageDataset, build_dataset, load_digits, load_mnist, to_model_range, to_uint8
from .folder import check_condition, open_folder
from .latents import (
    NO_VAE,
    LatentDataset,
    LatentSpace,
    as_vae,
    check_vae_fits,
    latent_decoder,
    latent_space,
    vae_reference,
)
from .loader import BatchIterator


def build_training_dataset(cfg) -> ImageDataset | LatentDataset:
    """The dataset ``cfg.data`` names: a packaged image set, a folder of the user's images, a
    latent cache, or a captioned set; for ``model.condition: text`` with its caption
    embeddings attached."""
    d = cfg.data
    if d.name == "latents":
        if not d.path:
            raise DataError("data.name=latents trains on a latent cache, and data.path is empty "
                            "(this config records only the latent space, enough to sample); set "
                            "data.path to a directory written by diffmoe cache-latents")
        ds = LatentDataset.open(d.path, d.limit)
        check_recorded_space(cfg.to_dict()["data"], ds.index)
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


def check_recorded_space(data: dict, index: dict) -> None:
    """Refuse to train on a cache whose latent normalisation is not the one the config
    records (a model fine-tuned on it would no longer be in the space it says it is in)."""
    recorded, cached = LatentSpace.of_config(data), LatentSpace.of_index(index)
    if recorded is None:
        return
    same = (recorded.scale, recorded.shift) == (cached.scale, cached.shift) and (
        recorded.downsampling in (0, cached.downsampling))
    if not same:
        raise DataError(f"the latent cache '{data['path']}' holds latents scaled by "
                        f"{cached.scale:g} (shift {cached.shift:g}, downsampling "
                        f"{cached.downsampling}) but the config records data.scale_factor="
                        f"{recorded.scale:g}, data.shift_factor={recorded.shift:g}, "
                        f"data.downsampling={recorded.downsampling}; write the cache with the "
                        f"model's VAE, or set data.scale_factor=0 for a new model")


def sample_decoder(data: dict, device: torch.device | str, vae=None,
                   channels: Optional[int] = None) -> Optional[Callable[[Tensor], Tensor]]:
    """For a latent model (``data`` is its config's data section as a dict): a function decoding
    its samples to images with a VAE: ``vae`` (a folder or an AutoencoderKL) if given, else
    ``data.vae``, else the one its cache was encoded with; checked against the model's latent
    ``channels`` and the recorded downsampling. None for pixel-space models. No VAE to be had
    is one DataError line saying what to pass."""
    if data.get("name") != "latents":
        return None
    if vae is None:
        vae = vae_reference(data)
    if not vae:
        raise DataError(f"this latent model names no VAE to decode its samples (no data.vae, "
                        f"no latent cache at data.path '{data.get('path', '')}'); {NO_VAE}")
    where = f"'{vae}'" if isinstance(vae, (str, Path)) else "passed"
    model = as_vae(vae, device)
    space = latent_space(data, model)
    check_vae_fits(model, space, channels, where)
    return latent_decoder(model, space)


def decoded_size(data: dict, input_size: int) -> int:
    """Side of the images a model's samples become (latent side × the VAE's downsampling)."""
    if data.get("name") != "latents":
        return input_size
    return input_size * max(1, latent_space(data).downsampling)


__all__ = ["BatchIterator", "ImageDataset", "LatentDataset", "build_dataset",
           "LatentSpace", "build_training_dataset", "decoded_size", "latent_space", "load_digits", "load_mnist",
           "sample_decoder", "to_model_range", "to_uint8"]
