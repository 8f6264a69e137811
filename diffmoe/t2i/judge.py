"""A GenEval-style judge for the shapes domain, deciding from pixels alone.

GenEval (Ghosh et al., 2023) asks an object detector whether a generated image shows what the
prompt asked for, in six categories: single object, two objects, counting, colours, position and
colour attribution; the overall score is the mean of the six category scores. In the synthetic
shapes domain detection can be exact instead:

1. **Colour segmentation.** Each pixel takes the nearest of the palette colours and the
   background (Euclidean RGB); a pixel farther than ``MAX_COLOUR_DISTANCE`` from every palette
   colour counts as background.
2. **Connected components** (4-connected) of each colour; components smaller than ``MIN_AREA``
   pixels are noise and dropped.
3. **Shape** from how much of its bounding box a component fills: a square fills all of it, a
   disc π/4 of it, a triangle about half (``SQUARE_MIN_FILL``, ``CIRCLE_MIN_FILL``).
4. The image is correct when these objects are exactly what the prompt describes
   (:func:`shapes.scene_holds`: counts, shapes, colours, and the relative position of centroids).

Beside the strict verdict, :func:`colour_match` is a lenient diagnostic for prompts that name
colours: are the named colours the image's largest colour areas, whatever the shapes?
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .shapes import (
    BACKGROUND,
    CATEGORY_NAMES,
    COLOURS,
    PlacedObject,
    Scene,
    category_of,
    parse_caption,
    scene_holds,
)

MAX_COLOUR_DISTANCE = 110.0  # RGB distance beyond which a pixel belongs to no palette colour
MIN_AREA = 10  # pixels; the smallest rendered object (an 8-pixel triangle) has about 36
SQUARE_MIN_FILL = 0.88  # fraction of the bounding box: square ~1.0
CIRCLE_MIN_FILL = 0.66  # disc ~0.79, triangle ~0.5-0.6

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES] + [BACKGROUND], dtype=np.float32)
_BACKGROUND_INDEX = len(_PALETTE_NAMES)


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    cx: float
    cy: float
    area: int
    fill: float


def segment_colours(image: np.ndarray) -> np.ndarray:
    """(H, W) palette index per pixel of an (H, W, 3) uint8 image; ``len(COLOURS)`` = background."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - _PALETTE, axis=-1)
    labels = dist.argmin(-1)
    far = dist.min(-1) > MAX_COLOUR_DISTANCE
    labels[far] = _BACKGROUND_INDEX
    return labels


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a boolean (H, W) mask, each as an (n, 2) array of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


def classify_shape(fill: float) -> str:
    if fill >= SQUARE_MIN_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_MIN_FILL else "triangle"


def detect(image: np.ndarray) -> list[Detection]:
    """Every object in an (H, W, 3) uint8 image."""
    labels = segment_colours(image)
    found = []
    for index, colour in enumerate(_PALETTE_NAMES):
        for pixels in connected_components(labels == index):
            if len(pixels) < MIN_AREA:
                continue
            ys, xs = pixels[:, 0], pixels[:, 1]
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            fill = len(pixels) / box
            # Centroid of the bounding box, as the renderer places objects (pixel centres at +0.5).
            found.append(Detection(colour, classify_shape(fill), (xs.min() + xs.max() + 1) / 2,
                                   (ys.min() + ys.max() + 1) / 2, len(pixels), fill))
    return found


def judge_image(scene: Scene, image: np.ndarray) -> bool:
    """Whether the image shows exactly the scene."""
    objects = [PlacedObject(d.colour, d.shape, float(d.cx), float(d.cy)) for d in detect(image)]
    return bool(scene_holds(scene, objects))


def colour_match(scene: Scene, image: np.ndarray) -> bool | None:
    """A lenient diagnostic beside the strict verdict: whether the colours the prompt names are
    the image's largest colour areas (k named colours → the k largest), whatever the shapes and
    counts. None for a prompt that names no colour."""
    named = {g.colour for g in scene.groups if g.colour}
    if not named:
        return None
    area = np.bincount(segment_colours(image).ravel(), minlength=len(_PALETTE))[:-1]
    largest = {_PALETTE_NAMES[i] for i in np.argsort(-area, kind="stable")[:len(named)]
               if area[i] > 0}
    return largest == named


def judge(prompts: list[str], images: np.ndarray) -> dict:
    """Judge one image per prompt ((N, H, W, 3) uint8). Returns the fraction correct per GenEval
    category (categories without prompts are left out), ``overall`` (their mean), the number of
    images per category, and the verdict per image."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    verdicts, by_category = [], {name: [] for name in CATEGORY_NAMES}
    colour_hits: dict[str, list[bool]] = {name: [] for name in CATEGORY_NAMES}
    for prompt, image in zip(prompts, images):
        scene = parse_caption(prompt)
        ok = judge_image(scene, image)
        verdicts.append(ok)
        by_category[category_of(scene)].append(ok)
        hit = colour_match(scene, image)
        if hit is not None:
            colour_hits[category_of(scene)].append(bool(hit))
    scores = {name: float(np.mean(v)) for name, v in by_category.items() if v}
    return {"scores": scores,
            "overall": float(np.mean(list(scores.values()))) if scores else float("nan"),
            "counts": {name: len(v) for name, v in by_category.items() if v},
            "colour_match": {name: float(np.mean(v)) for name, v in colour_hits.items() if v},
            "verdicts": verdicts}
