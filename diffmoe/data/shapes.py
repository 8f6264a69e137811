"""The procedural shapes domain for text-to-image: scenes, their captions and their renders.

A scene is one or two *groups* of identical objects, each group a count (1-4), an optional
colour and a shape, and between two groups either "and" or a relative position ("left of",
"right of", "above", "below"). Captions are written from a scene and parsed back into one, so
the judge (diffmoe/t2i/judge.py) checks any caption of the grammar::

    caption  := group [(" and " | " left of " | " right of " | " above " | " below ") group]
    group    := ("a" | "one" | "two" | "three" | "four") [colour] shape["s"]

e.g. "a circle", "two red circles left of a blue square". Renders are deterministic given a
seed: flat-coloured shapes (no anti-aliasing) on a black background, separated by at least
``GAP`` pixels, so colour segmentation and connected components recover every object exactly.

The captions of the training data follow GenEval's six categories (single object, two objects,
counting, colours, position, colour attribution); ``CATEGORIES`` builds each.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import ConfigError, DataError

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
# Well separated in RGB (pairwise distance > 140) and far from the black background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
    "purple": (190, 50, 220),
    "cyan": (40, 220, 220),
}
BACKGROUND = (0, 0, 0)
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
WORD_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
MAX_COUNT = 4
RELATIONS = ("left of", "right of", "above", "below")
JOINERS = ("and",) + RELATIONS
MIN_SIZE, MAX_SIZE = 10, 13  # object side (bounding box) in pixels
GAP = 2  # minimum empty pixels between two objects' bounding boxes
PLACEMENT_TRIES = 200
EDGE_DEFECT_LENGTH = 4  # pixels: the patch size of the T2I configs

CATEGORY_NAMES = ("single_object", "two_object", "counting", "colors", "position",
                  "color_attr")


@dataclass(frozen=True)
class Group:
    count: int
    colour: Optional[str]
    shape: str

    def text(self) -> str:
        colour = f"{self.colour} " if self.colour else ""
        plural = "s" if self.count > 1 else ""
        return f"{COUNT_WORDS[self.count]} {colour}{self.shape}{plural}"

    def matches(self, colour: str, shape: str) -> bool:
        return shape == self.shape and (self.colour is None or colour == self.colour)


@dataclass(frozen=True)
class Scene:
    groups: tuple[Group, ...]
    joiner: Optional[str] = None  # "and" or a relation, for two groups

    def caption(self) -> str:
        if len(self.groups) == 1:
            return self.groups[0].text()
        return f" {self.joiner} ".join(g.text() for g in self.groups)

    @property
    def num_objects(self) -> int:
        return sum(g.count for g in self.groups)


@dataclass(frozen=True)
class PlacedObject:
    """An object in an image: its colour, shape, bounding box side and top-left corner; or, as
    the judge finds it, its centroid."""

    colour: str
    shape: str
    cx: float
    cy: float


_GROUP_RE = re.compile(r"^(a|an|one|two|three|four) (?:(%s) )?(%s)(s?)$" % (
    "|".join(COLOURS), "|".join(SHAPES)))
_JOIN_RE = re.compile(r" (%s) " % "|".join(JOINERS))


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes; :class:`DataError` if it is outside the grammar."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    parts = _JOIN_RE.split(text)
    if len(parts) not in (1, 3):
        raise DataError(f"caption {caption!r} is not in the shapes grammar; write e.g. "
                        f"'two red circles left of a blue square'")
    groups = []
    for part in parts[::2]:
        m = _GROUP_RE.match(part)
        if m is None:
            raise DataError(f"caption {caption!r}: '{part}' is not '<count> [colour] <shape>' "
                            f"with a count of a/one..four, colours {list(COLOURS)} and shapes "
                            f"{list(SHAPES)}")
        count = WORD_COUNTS[m.group(1)]
        if (count > 1) != bool(m.group(4)):
            raise DataError(f"caption {caption!r}: '{part}' mixes singular and plural")
        groups.append(Group(count, m.group(2), m.group(3)))
    return Scene(tuple(groups), parts[1] if len(parts) == 3 else None)


def scene_holds(scene: Scene, objects: list[PlacedObject]) -> bool:
    """Whether ``objects`` are exactly what ``scene`` describes: as many objects as it names,
    each group matched by exactly its count of objects (of its shape, and colour if given), no
    object left over, and the relation holding between every object of the first group and every
    object of the second (by centroid)."""
    if len(objects) != scene.num_objects:
        return False
    taken: set[int] = set()
    # Groups with a colour first, so "a circle and a red circle" assigns the red one correctly.
    order = sorted(range(len(scene.groups)), key=lambda i: scene.groups[i].colour is None)
    by_group: dict[int, list[PlacedObject]] = {}
    for gi in order:
        g = scene.groups[gi]
        found = [i for i, o in enumerate(objects)
                 if i not in taken and g.matches(o.colour, o.shape)]
        if len(found) < g.count:
            return False
        chosen = found[: g.count]
        taken.update(chosen)
        by_group[gi] = [objects[i] for i in chosen]
    if len(taken) != len(objects):
        return False
    assigned = [by_group[i] for i in range(len(scene.groups))]
    if scene.joiner in (None, "and"):
        return True
    return relation_holds(scene.joiner, *assigned)


def relation_holds(relation: str, a: list[PlacedObject], b: list[PlacedObject]) -> bool:
    """Whether every object of ``a`` is ``relation`` ("left of", ...) every object of ``b``, by
    centre."""
    if relation == "left of":
        return max(o.cx for o in a) < min(o.cx for o in b)
    if relation == "right of":
        return min(o.cx for o in a) > max(o.cx for o in b)
    if relation == "above":
        return max(o.cy for o in a) < min(o.cy for o in b)
    if relation == "below":
        return min(o.cy for o in a) > max(o.cy for o in b)
    raise DataError(f"unknown relation {relation!r}; use one of {list(RELATIONS)}")


# -- rendering ---------------------------------------------------------------------------------

def shape_mask(shape: str, size: int) -> np.ndarray:
    """A (size, size) boolean mask of the shape filling its bounding box: a square, an inscribed
    disc, or an upward isosceles triangle (apex at the top centre, base the bottom row)."""
    coords = np.arange(size) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        r = size / 2
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    if shape == "triangle":
        half_width = yy / size * (size / 2)  # grows from 0 at the apex to size/2 at the base
        return np.abs(xx - size / 2) <= half_width
    raise DataError(f"unknown shape '{shape}'; use one of {list(SHAPES)}")


def _place(scene: Scene, rng: random.Random, image_size: int
           ) -> Optional[list[tuple[str, str, int, int, int]]]:
    """Random non-touching boxes for the scene's objects satisfying its relation, as (colour,
    shape, size, x0, y0); None if none was found in ``PLACEMENT_TRIES`` tries."""
    for _ in range(PLACEMENT_TRIES):
        boxes: list[tuple[str, str, int, int, int]] = []
        colours = [g.colour or rng.choice(list(COLOURS)) for g in scene.groups]
        ok = True
        for g, colour in zip(scene.groups, colours):
            for _ in range(g.count):
                size = rng.randint(MIN_SIZE, MAX_SIZE)
                for _ in range(PLACEMENT_TRIES):
                    x0 = rng.randint(0, image_size - size)
                    y0 = rng.randint(0, image_size - size)
                    if all(x0 + size + GAP <= bx or bx + bs + GAP <= x0 or y0 + size + GAP <= by
                           or by + bs + GAP <= y0 for _, _, bs, bx, by in boxes):
                        break
                else:
                    ok = False
                    break
                boxes.append((colour, g.shape, size, x0, y0))
            if not ok:
                break
        if ok:
            placed = [PlacedObject(c, s, x + n / 2, y + n / 2) for c, s, n, x, y in boxes]
            if scene_holds(scene, placed):
                return boxes
    return None


def render(scene: Scene, seed: int, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(image_size, image_size, 3) uint8 image of the scene; deterministic in ``seed``."""
    rng = random.Random(seed)
    boxes = _place(scene, rng, image_size)
    if boxes is None:
        raise DataError(f"cannot fit {scene.caption()!r} into a {image_size}x{image_size} image; "
                        f"use fewer objects or a larger image")
    image = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for colour, shape, size, x0, y0 in boxes:
        mask = shape_mask(shape, size)
        image[y0:y0 + size, x0:x0 + size][mask] = COLOURS[colour]
    return image


def add_edge_defects(image: np.ndarray, count: int, depth: int, rng: random.Random) -> np.ndarray:
    """A copy of a one-object render with ``count`` edge defects of the kind a patch-4 model
    draws: each a strip ``EDGE_DEFECT_LENGTH`` pixels along the edge at a random boundary pixel,
    ``depth`` pixels deep, either added outside the object (a bump) or cut from it (a bite).
    For checking how the judge's shape test copes with imperfect drawing."""
    out = image.copy()
    height, width = out.shape[:2]
    drawn = (out != BACKGROUND).any(-1)
    if not drawn.any():
        raise ValueError("add_edge_defects needs an image with an object; this one is blank")
    colour = out[drawn][0].copy()
    for _ in range(count):
        mask = (out != BACKGROUND).any(-1)
        edges = [(y, x, dy, dx) for y, x in zip(*np.nonzero(mask))
                 for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))
                 if not (0 <= y + dy < height and 0 <= x + dx < width) or not mask[y + dy, x + dx]]
        y, x, dy, dx = rng.choice(edges)
        along_y, along_x = (0, 1) if dy else (1, 0)
        start = rng.randint(1 - EDGE_DEFECT_LENGTH, 0)
        bump = rng.random() < 0.5
        for a in range(start, start + EDGE_DEFECT_LENGTH):
            for d in range(depth):
                step = d + 1 if bump else -d  # outward from the edge pixel, or inward from it
                py, px = y + dy * step + along_y * a, x + dx * step + along_x * a
                if 0 <= py < height and 0 <= px < width:
                    out[py, px] = colour if bump else BACKGROUND
    return out


# -- GenEval-style categories ------------------------------------------------------------------

def _two_shapes(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(SHAPES, 2)
    return a, b


def _single_object(rng: random.Random) -> Scene:
    return Scene((Group(1, None, rng.choice(SHAPES)),))


def _two_object(rng: random.Random) -> Scene:
    a, b = _two_shapes(rng)
    return Scene((Group(1, None, a), Group(1, None, b)), "and")


def _counting(rng: random.Random) -> Scene:
    return Scene((Group(rng.randint(2, MAX_COUNT), None, rng.choice(SHAPES)),))


def _colors(rng: random.Random) -> Scene:
    return Scene((Group(1, rng.choice(list(COLOURS)), rng.choice(SHAPES)),))


def _position(rng: random.Random) -> Scene:
    a, b = _two_shapes(rng)
    return Scene((Group(1, None, a), Group(1, None, b)), rng.choice(RELATIONS))


def _color_attr(rng: random.Random) -> Scene:
    a, b = _two_shapes(rng)
    ca, cb = rng.sample(list(COLOURS), 2)
    return Scene((Group(1, ca, a), Group(1, cb, b)), "and")


CATEGORIES: dict[str, Callable[[random.Random], Scene]] = {
    "single_object": _single_object, "two_object": _two_object, "counting": _counting,
    "colors": _colors, "position": _position, "color_attr": _color_attr,
}


def category_of(scene: Scene) -> str:
    """The GenEval category a scene's caption belongs to."""
    if len(scene.groups) == 2:
        if scene.joiner in RELATIONS:
            return "position"
        return "color_attr" if any(g.colour for g in scene.groups) else "two_object"
    g = scene.groups[0]
    if g.count > 1:
        return "counting"
    return "colors" if g.colour else "single_object"


def random_scenes(num: int, seed: int) -> list[Scene]:
    """``num`` scenes, the categories in turn, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [CATEGORIES[CATEGORY_NAMES[i % len(CATEGORY_NAMES)]](rng) for i in range(num)]


def eval_prompts(per_category: int, seed: int,
                 categories: tuple[str, ...] = CATEGORY_NAMES) -> list[tuple[str, str]]:
    """(category, caption) pairs, ``per_category`` of each of ``categories``, deterministic in
    ``seed``: distinct captions, cycled where a category has fewer (single_object has only 3).
    A category's prompts are the same whichever other categories are asked for."""
    unknown = [c for c in categories if c not in CATEGORY_NAMES]
    if unknown:
        raise ConfigError(f"unknown judge categories {unknown}; choose from {list(CATEGORY_NAMES)}")
    if not categories:
        raise ConfigError(f"no judge category given; choose from {list(CATEGORY_NAMES)}")
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for name in CATEGORY_NAMES:
        seen: list[str] = []
        for _ in range(PLACEMENT_TRIES * per_category):
            caption = CATEGORIES[name](rng).caption()
            if caption not in seen:
                seen.append(caption)
            if len(seen) == per_category:
                break
        if name in categories:
            out += [(name, seen[i % len(seen)]) for i in range(per_category)]
    return out
