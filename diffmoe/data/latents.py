"""Latent caches for ImageNet-scale training (paper §6): images → VAE latents, once.

``diffmoe cache-latents IMAGE_FOLDER OUT`` reads a folder of images (imagefolder.py: class
subfolders, the ImageNet layout, classes numbered in sorted order; or a ``metadata.jsonl`` of
captions), center-crops every image to ``--image-size`` as ADM does
(:func:`~.imagefolder.center_crop`), decoding them in ``--workers`` processes, and encodes the
image and its horizontal flip with a diffusers ``AutoencoderKL`` loaded from a local directory
(nothing is downloaded). The posterior mean is stored, as float16.

Layout of OUT::

    cache.json               the settings (source, VAE, sizes); a rerun must match them
    shard_00000.npy          (n, 2, C, h, w) float16 latents: [:, 0] the image, [:, 1] its flip
    shard_00000.labels.npy   (n,) int64 class indices (or indices into the captions)
    shard_00000.json         written last: the shard's count and the images that failed to decode
    index.json               written when every shard is done: shards, classes (or captions),
                             scale factor
    skipped.txt              every image that could not be decoded (also logged as a warning)

Shard i belongs to rank i mod W under ``torchrun``; a shard whose ``.json`` exists is done, so a
killed run started again continues where it stopped. Training (``data.name=latents``,
``data.path=OUT``) reads the shards memory-mapped and returns ``(z - shift) · scale`` of the image
or its flip, chosen at random per sample; samples are decoded with the same VAE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .. import distributed
from ..config.ranges import IMAGES, PROCESSES, SIDE, check_int
from ..device import resolve_device
from ..errors import DataError
from ..fileio import atomic_write, atomic_write_text, to_json, write_json
from ..models.condition import TextCondition
from ..paths import check_outputs
from .imagefolder import Decoder, FolderListing, list_folder, map_grouped, report_skipped
from .text_encoder import CaptionLabels

log = logging.getLogger(__name__)

DEFAULT_SCALE_FACTOR = 0.18215  # Stable Diffusion's VAE, when its config names none
CACHE_VERSION = 1
LATENT_DTYPE = np.float16
VAE_CLASS = "AutoencoderKL"
DIFFUSERS_INSTALL = "pip install diffusers==0.42.1"
CACHE_SETTINGS = "cache.json"  # the file that marks a folder as one of our latent caches


# -- the VAE --------------------------------------------------------------------------------

def load_vae(path: str | Path, device: torch.device | str = "cpu"):
    """A diffusers ``AutoencoderKL`` from a local directory (config.json + weights), in eval
    mode. A missing directory, another kind of model or unreadable weights raise DataError."""
    path = Path(path)
    fix = ("pass the local directory of a diffusers AutoencoderKL (e.g. sd-vae-ft-ema, with "
           "config.json and its weights)")
    if not path.is_dir():
        raise DataError(f"VAE directory '{path}' does not exist; {fix}")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise DataError(f"'{path}' is not a VAE directory (no config.json); {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"'{path}' is not a VAE directory (config.json is not JSON); "
                        f"{fix}") from None
    if not isinstance(config, dict) or config.get("_class_name") != VAE_CLASS:
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise DataError(f"'{path}' is not a VAE directory (its config.json describes "
                        f"{found or 'no diffusers model'}, not {VAE_CLASS}); {fix}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DataError(f"the VAE needs diffusers: {DIFFUSERS_INSTALL}") from None
    try:
        vae = AutoencoderKL.from_pretrained(str(path), low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"VAE directory '{path}' cannot be loaded ({reason}); {fix}") from None
    return vae.to(device).eval().requires_grad_(False)


def as_vae(vae, device: torch.device | str = "cpu"):
    """An AutoencoderKL from ``vae``: a local directory (:func:`load_vae`) or a loaded model,
    taken as it is."""
    if isinstance(vae, (str, Path)):
        return load_vae(vae, device)
    if type(vae).__name__ != VAE_CLASS or not hasattr(vae, "decode"):
        raise DataError(f"vae must be a diffusers {VAE_CLASS} or the path of its folder, got "
                        f"{type(vae).__name__}")
    return vae


def vae_factors(vae) -> tuple[float, float]:
    """(scale, shift) of the latent normalisation z' = (z − shift) · scale, from the VAE's
    config (SD's 0.18215 and no shift when it names none)."""
    cfg = vae.config
    scale = getattr(cfg, "scaling_factor", None) or DEFAULT_SCALE_FACTOR
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return float(scale), float(shift)


def vae_downsampling(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# -- writing the cache ----------------------------------------------------------------------

def _shard_name(i: int) -> str:
    return f"shard_{i:05d}"


@torch.no_grad()
def encode_batch(vae, pixels: np.ndarray, device: torch.device | str) -> np.ndarray:
    """Latents (B, 2, C, h, w) of uint8 (B, H, W, 3) images ([:, 0]) and their flips ([:, 1])."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device)
    x = x.float().div(127.5).sub(1.0)  # (B, 3, H, W) in [-1, 1]
    both = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)  # image, flip, image, flip, ...
    z = vae.encode(both).latent_dist.mean
    return z.view(x.shape[0], 2, *z.shape[1:]).float().cpu().numpy()


def encode_shards(vae, listing: FolderListing, shards: dict[int, list[int]], image_size: int,
                  batch_size: int, device: torch.device | str, workers: int = 0
                  ) -> Iterator[tuple[int, np.ndarray, np.ndarray, list[str]]]:
    """Per shard (its number → the indices of its files), in order: the latents (n, 2, C, h,
    w) of its images and their flips, their labels, and the files that could not be decoded
    (left out). ``workers`` processes decode the images; the batches the VAE sees are the same
    for any number of them, so are the latents."""
    parts: dict[int, tuple[list, list, list]] = {shard: ([], [], []) for shard in shards}
    for shard, items, last in map_grouped(listing.files, Decoder(image_size, 3), shards,
                                          batch_size, workers):
        latents, labels, skipped = parts[shard]
        skipped += [failure for _, _, failure in items if failure]
        good = [(i, pixels) for i, pixels, failure in items if not failure]
        if good:
            latents.append(encode_batch(vae, np.stack([p for _, p in good]), device))
            labels += [listing.labels[i] for i, _ in good]
        if last:
            out = np.concatenate(latents).astype(LATENT_DTYPE) if latents else \
                np.zeros((0, 2, 0, 0, 0), dtype=LATENT_DTYPE)
            yield shard, out, np.asarray(labels, dtype=np.int64), skipped
            del parts[shard]


def cache_latents(image_folder: str | Path, out: str | Path, vae_dir: str | Path,
                  image_size: int = 256, shard_size: int = 1000, batch_size: int = 32,
                  device: str = "auto", progress: bool = True, workers: int = 0
                  ) -> Optional[dict]:
    """Write (or finish) a latent cache; under torchrun each rank encodes its shards, each with
    ``workers`` decoding processes. Returns the index on rank 0 (None elsewhere)."""
    for flag, value, limit in (("--image-size", image_size, SIDE),
                               ("--shard-size", shard_size, IMAGES),
                               ("--batch-size", batch_size, IMAGES),
                               ("--workers", workers, PROCESSES)):
        check_int(flag, value, limit, sep=" ")
    out = Path(out)
    check_cache_output(out)
    dev = resolve_device(device, "--device")
    info = distributed.setup(dev.type)
    if dev.type == "cuda":
        dev = torch.device("cuda", info.cuda_index)
    finished = False
    try:
        listing = list_folder(image_folder)
        vae = load_vae(vae_dir, dev)
        scale, shift = vae_factors(vae)
        settings = {"version": CACHE_VERSION, "source": str(Path(image_folder).resolve()),
                    "vae": str(Path(vae_dir).resolve()), "image_size": image_size,
                    "shard_size": shard_size, "num_files": len(listing),
                    "classes": listing.classes, "scale_factor": scale, "shift_factor": shift,
                    "downsampling": vae_downsampling(vae)}
        if listing.captioned:  # only then, so that a class cache's settings are as they were
            settings["captions"] = listing.captions
        _check_settings(out, settings, info.is_main)
        distributed.barrier()
        num_shards = -(-len(listing) // shard_size)
        mine = [i for i in range(num_shards) if i % info.world_size == info.rank]
        todo = [i for i in mine if not (out / f"{_shard_name(i)}.json").is_file()]
        if len(todo) < len(mine):
            log.info("rank %d: %d of its %d shards already done; continuing", info.rank,
                     len(mine) - len(todo), len(mine))
        shards = {i: list(range(i * shard_size, min(len(listing), (i + 1) * shard_size)))
                  for i in todo}
        for i, z, y, skipped in tqdm(
                encode_shards(vae, listing, shards, image_size, batch_size, dev, workers),
                total=len(todo), desc="cache-latents",
                disable=not (progress and info.is_main), dynamic_ncols=True):
            save_shard(out, i, z, y, skipped)
        distributed.barrier()
        index = _write_index(out, settings, num_shards) if info.is_main else None
        finished = True
        return index
    finally:
        distributed.teardown(wait_for_others=finished)


def save_shard(out: Path, i: int, latents: np.ndarray, labels: np.ndarray,
               skipped: list[str]) -> None:
    """Shard ``i``'s latents and labels, then (last, marking it done) its ``.json``."""
    name = _shard_name(i)
    atomic_write(out / f"{name}.npy", lambda p: _save_npy(p, latents), durable=True)
    atomic_write(out / f"{name}.labels.npy", lambda p: _save_npy(p, labels), durable=True)
    meta = {"count": int(latents.shape[0]), "skipped": skipped}
    atomic_write_text(out / f"{name}.json", to_json(meta))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array)


def check_cache_output(out: Path) -> None:
    """Refuse an OUT that is a file, or a folder holding files but no latent cache of ours (a
    cache of ours is continued: every file in it is one this command writes), or one that
    cannot be written; before any image is read."""
    if out.exists() and not out.is_dir():
        raise DataError(f"cache directory '{out}' is a file; choose another OUT")
    if out.is_dir() and not (out / CACHE_SETTINGS).is_file():
        other = next(iter(sorted(out.iterdir())), None)
        if other is not None:
            raise DataError(f"cache directory '{out}' already holds files but no latent cache "
                            f"(e.g. '{other.name}', and no {CACHE_SETTINGS}); choose a new or "
                            f"empty OUT")
    check_outputs([out / CACHE_SETTINGS], force=True, option="OUT")


def _check_settings(out: Path, settings: dict, main: bool) -> None:
    path = out / CACHE_SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        diffs = [k for k in settings if old.get(k) != settings[k]]
        if diffs:
            raise DataError(f"cache directory '{out}' holds a cache made with other settings "
                            f"({', '.join(diffs[:3])} differ); choose another OUT or repeat the "
                            f"original command")
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, settings)


def _write_index(out: Path, settings: dict, num_shards: int) -> dict:
    shards, skipped = [], []
    for i in range(num_shards):
        meta = json.loads((out / f"{_shard_name(i)}.json").read_text())
        shards.append({"name": _shard_name(i), "count": meta["count"]})
        skipped += meta["skipped"]
    index = dict(settings, shards=shards, num_latents=sum(s["count"] for s in shards),
                 num_skipped=len(skipped))
    report_skipped(skipped, out / "skipped.txt")
    write_json(out / "index.json", index)
    kinds = (f"{len(settings['captions'])} captions" if settings.get("captions")
             else f"{len(settings['classes'])} classes")
    log.info("latent cache %s: %d images of %s in %d shards", out, index["num_latents"], kinds,
             num_shards)
    return index


# -- reading the cache ----------------------------------------------------------------------

def read_index(path: str | Path) -> dict:
    path = Path(path)
    index_file = path / "index.json"
    if not index_file.is_file():
        partial = (path / "cache.json").is_file()
        raise DataError(
            f"'{path}' is not a finished latent cache (no index.json); "
            + ("run the same diffmoe cache-latents command again to finish it" if partial
               else "write one with diffmoe cache-latents IMAGE_FOLDER OUT --vae VAE_DIR"))
    try:
        return json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"latent cache index '{index_file}' is damaged; write the cache "
                        f"again") from None


@dataclass
class LatentDataset(CaptionLabels):
    """The shards of a latent cache, memory-mapped. Same attributes as ImageDataset as far as
    training needs them: ``image_size`` and ``channels`` are the latents'. A cache of a
    captioned folder has ``captions`` (its labels index them) and, once attached, their
    embeddings in ``text``."""

    path: Path
    index: dict
    latents: list[np.ndarray]  # per shard (n, 2, C, h, w)
    labels: Tensor  # (N,)
    offsets: np.ndarray  # first global index of each shard, plus N
    name: str = "latents"
    text: Optional[TextCondition] = None
    contents: Optional[str] = None  # which latents it holds (as ImageDataset.contents)
    class_names: tuple[str, ...] = ()  # as ImageDataset.class_names; a cache records none

    @classmethod
    def open(cls, path: str | Path, limit: int = 0) -> "LatentDataset":
        path = Path(path)
        index = read_index(path)
        latents, labels = [], []
        for shard in index["shards"]:
            if shard["count"] == 0:
                continue
            try:
                latents.append(np.load(path / f"{shard['name']}.npy", mmap_mode="r"))
                labels.append(np.load(path / f"{shard['name']}.labels.npy"))
            except (OSError, ValueError) as exc:
                raise DataError(f"latent cache shard {path / shard['name']} is unreadable "
                                f"({exc}); write the cache again") from None
        if not latents:
            raise DataError(f"latent cache '{path}' holds no latents; check its skipped.txt")
        counts = [a.shape[0] for a in latents]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        ds = cls(path, index, latents, torch.from_numpy(np.concatenate(labels)), offsets,
                 contents=hashlib.sha256(to_json(index["shards"]).encode()).hexdigest())
        if limit and limit < len(ds):
            ds.labels = ds.labels[:limit]
        return ds

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.latents[0].shape[2])

    @property
    def image_size(self) -> int:
        return int(self.latents[0].shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.index["classes"])

    @property
    def captions(self) -> list[str]:
        return self.index.get("captions", [])

    def batch(self, idx: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Normalised latents of ``idx``, each the image or its flip at random, and their
        labels (their captions' embeddings once attached)."""
        idx_np = idx.numpy()
        shard = np.searchsorted(self.offsets, idx_np, side="right") - 1
        rows = np.empty((len(idx_np), *self.latents[0].shape[1:]), dtype=LATENT_DTYPE)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            local = idx_np[sel] - self.offsets[s]
            order = np.argsort(local)  # sorted reads from the memory map
            rows[sel[order]] = self.latents[s][local[order]]
        flip = torch.randint(0, 2, (len(idx_np),), generator=generator)
        z = torch.from_numpy(rows)[torch.arange(len(idx_np)), flip].float()
        scale, shift = self.index["scale_factor"], self.index["shift_factor"]
        condition = self.labels[idx] if self.text is None else self.conditions(idx)
        return (z - shift) * scale, condition


# -- decoding a latent model's samples ---------------------------------------------------------

NO_VAE = ("pass the diffusers AutoencoderKL folder it was trained with (e.g. sd-vae-ft-mse): "
          "--vae DIR to diffmoe sample, vae=DIR or an AutoencoderKL in Python; or ask for the "
          "latents themselves (output_type='latent')")


@dataclass(frozen=True)
class LatentSpace:
    """How a latent model's samples z' become images: z = z' / scale + shift, decoded by a VAE
    that turns each latent into ``downsampling`` × ``downsampling`` pixels (0: not known)."""

    scale: float
    shift: float
    downsampling: int

    @classmethod
    def of_config(cls, data: dict) -> Optional["LatentSpace"]:
        """The space a config's data section records (save_pretrained, import-official), or
        None when it leaves it to the cache (``data.scale_factor`` 0)."""
        if not data.get("scale_factor"):
            return None
        return cls(float(data["scale_factor"]), float(data.get("shift_factor") or 0.0),
                   int(data.get("downsampling") or 0))

    @classmethod
    def of_index(cls, index: dict) -> "LatentSpace":
        return cls(float(index["scale_factor"]), float(index["shift_factor"]),
                   int(index.get("downsampling", 0)))

    @classmethod
    def of_vae(cls, vae) -> "LatentSpace":
        return cls(*vae_factors(vae), vae_downsampling(vae))


def finished_index(path: str) -> Optional[dict]:
    """The index of the latent cache at ``path``, None when there is none (no path, or a cache
    that was moved, deleted or never finished)."""
    if not path or not (Path(path) / "index.json").is_file():
        return None
    return read_index(path)


def latent_space(data: dict, vae=None) -> LatentSpace:
    """The latent space of a model trained with the data section ``data``: the one its config
    records, else its cache's, else (a cache gone, nothing recorded) the VAE's own config."""
    recorded = LatentSpace.of_config(data)
    if recorded is not None:
        return recorded
    index = finished_index(data.get("path", ""))
    if index is not None:
        return LatentSpace.of_index(index)
    if vae is None:
        raise DataError(f"this latent model's cache '{data.get('path')}' is gone and its config "
                        f"records no data.scale_factor, so its latents cannot be decoded; "
                        f"{NO_VAE}")
    log.info("latent cache '%s' not found: decoding with the scale factors of the VAE's "
             "config, as the cache took them", data.get("path"))
    return LatentSpace.of_vae(vae)


def vae_reference(data: dict) -> str:
    """The VAE a latent model's config names: ``data.vae``, else its cache's; "" if neither."""
    if data.get("vae"):
        return str(data["vae"])
    index = finished_index(data.get("path", ""))
    return str(index.get("vae", "")) if index is not None else ""


def check_vae_fits(vae, space: LatentSpace, channels: Optional[int], where: str) -> None:
    """Refuse a VAE whose latents are not the model's: other channels or downsampling."""
    latent = int(getattr(vae.config, "latent_channels", 0))
    if channels is not None and latent != channels:
        raise DataError(f"the VAE {where} has {latent} latent channels but the model "
                        f"{channels}; {NO_VAE}")
    down = vae_downsampling(vae)
    if space.downsampling and down != space.downsampling:
        raise DataError(f"the VAE {where} downsamples by {down} but the model's latents come "
                        f"from a VAE that downsamples by {space.downsampling}; {NO_VAE}")
    scale, shift = vae_factors(vae)
    if (scale, shift) != (space.scale, space.shift):
        log.warning("the VAE %s names scale %g, shift %g in its config; the model was trained "
                    "with scale %g, shift %g, which decoding uses", where, scale, shift,
                    space.scale, space.shift)


def latent_decoder(vae, space: LatentSpace, batch_size: int = 16) -> Callable[[Tensor], Tensor]:
    """A function from the model's latents to images in [-1, 1] (on the CPU), decoded with
    ``vae`` (an AutoencoderKL) on the device it is on."""
    device = next(vae.parameters()).device

    @torch.no_grad()
    def decode(z: Tensor) -> Tensor:
        out = []
        for chunk in z.split(batch_size):
            chunk = chunk.to(device, torch.float32) / space.scale + space.shift
            out.append(vae.decode(chunk).sample.clamp(-1, 1).float().cpu())
        return torch.cat(out)

    return decode
