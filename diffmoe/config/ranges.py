"""The range of every integer setting: each integer config key (declared with its field in
:mod:`.schema`) and each integer command-line option (and the Python API's integer arguments) has
one :class:`Range`, and :func:`check_int` is the one check they all go through, before anything
is built or allocated. An upper limit is where a
value stops meaning anything on any machine (a seed wider than 64 bits, a step number beyond the
8 digits of checkpoint names, a tensor side no memory holds), so that an absurd value is one line
naming the limit instead of an overflow or an allocator's traceback."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Range:
    """``low..high``; ``hint``: what the value means (said when it is too small); ``why``: why
    ``high`` is the limit (said when it is too large)."""

    low: int
    high: int
    why: str
    hint: str = ""

    def replace(self, **changes) -> "Range":
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return f"{self.low}..{self.high}"


@dataclass(frozen=True)
class Interval:
    """The bounds of a real-valued setting: ``low <= value`` (``low < value`` if
    ``open_low``) and ``value < high`` (``<= high`` if ``closed_high``); ``hint``: what the value
    means, said with the bounds."""

    low: float
    high: float = math.inf
    open_low: bool = False
    closed_high: bool = False
    hint: str = ""

    def replace(self, **changes) -> "Interval":
        return dataclasses.replace(self, **changes)

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return above and (value <= self.high if self.closed_high else value < self.high)

    def __str__(self) -> str:
        if self.high == math.inf:
            return "positive" if self.open_low and self.low == 0 else f">= {self.low:g}"
        return (f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                f"{']' if self.closed_high else ')'}")


POSITIVE = Interval(0, open_low=True)
NON_NEGATIVE = Interval(0)
FRACTION = Interval(0, 1)  # [0, 1): a dropout rate, an EMA decay
PROBABILITY = Interval(0, 1, closed_high=True)


INT64_MAX = 2 ** 63 - 1
SEED = Range(0, INT64_MAX, "a seed is a non-negative 64-bit integer",
             "a seed is a non-negative 64-bit integer")
# Checkpoints are named step_XXXXXXXX: a step must fit in 8 digits.
STEP = Range(1, 10 ** 8 - 1, "checkpoint names hold 8 digits of step")
STEP_OR_0 = Range(0, STEP.high, STEP.why)
# Sides, widths and counts that size a tensor: far beyond any model or image of the field, and
# still small enough that the product of a few of them is no integer overflow.
SIDE = Range(1, 2 ** 14, "a side beyond 16384 pixels or latents cannot be held in memory")
WIDTH = Range(1, 2 ** 16, "a width beyond 65536 cannot be held in memory")
DEPTH = Range(1, 2 ** 12, "more than 4096 blocks cannot be held in memory")
CHANNELS = Range(1, 2 ** 12, "more than 4096 channels cannot be held in memory")
EXPERTS = Range(1, 2 ** 12, "more than 4096 experts cannot be held in memory")
CLASSES = Range(1, 2 ** 24, "a class table of more than 16777216 rows cannot be held in memory")
TOKENS = Range(1, 2 ** 16, "captions of more than 65536 tokens cannot be encoded")
# Images drawn or held at once, and sampling steps (a tensor of this many timesteps).
IMAGES = Range(1, 2 ** 24, "more than 16777216 images cannot be held in memory")
SAMPLING_STEPS = Range(1, 10 ** 6, "more than a million steps cannot be integrated")
PROCESSES = Range(0, 2 ** 10, "more than 1024 processes is no setting of one machine")
THREADS = Range(0, 2 ** 12, "more than 4096 threads is no setting of one machine")
COUNT = Range(0, INT64_MAX, "counts are 64-bit integers")

# Integer command-line options that are no config key (argparse dest -> option, range); the
# sampling options (--steps, --num of sample, --seed, --batch-size, ...) are checked as their
# sample.* keys.
OPTION_RANGES: dict[str, tuple[str, Range]] = {
    "image_size": ("--image-size", SIDE),
    "shard_size": ("--shard-size", IMAGES),
    "workers": ("--workers", PROCESSES),
    "feature_batch": ("--feature-batch", IMAGES),
    "per_category": ("--per-category", IMAGES),
    "samples_per_prompt": ("--samples-per-prompt", IMAGES),
    "num_per_batch_size": ("--num-per-batch-size", IMAGES),
    "batch_sizes": ("--batch-sizes", IMAGES),
    "gpus": ("--gpus", Range(1, 2 ** 16, "more than 65536 ranks is no job of one launch",
                             "the GPUs (ranks) to plan for")),
}
# Integer options named alike in several commands, checked per command (command -> dest -> ...).
COMMAND_OPTION_RANGES: dict[str, dict[str, tuple[str, Range]]] = {
    "cache-latents": {"batch_size": ("--batch-size", IMAGES)},
    "eval": {"num": ("--num", IMAGES)},
    "sweep-thresholds": {"num": ("--num", IMAGES)},
    "analyze": {"num": ("--num", IMAGES)},
    "fid": {"num": ("--num", IMAGES)},
}


def check_real(name: str, value: float, r: Interval) -> None:
    """``value`` of the config key ``name`` within ``r``, else one ``ConfigError`` line."""
    if value not in r:
        hint = f" ({r.hint})" if r.hint else ""
        raise ConfigError(f"{name}={value} must be {r}{hint}")


def check_int(name: str, value: int, r: Range, sep: str = "=") -> None:
    """``value`` of the setting ``name`` within ``r``, else one ``ConfigError`` line saying the
    limit (``sep`` joins name and value: ``=`` for a config key, a space for an option)."""
    if value < r.low:
        need = "a positive integer" if r.low == 1 else f">= {r.low}"
        hint = f" ({r.hint})" if r.hint else ""
        raise ConfigError(f"{name}{sep}{value} must be {need}{hint}")
    if value > r.high:
        raise ConfigError(f"{name}{sep}{value} is more than {r.high}, the most it may be ("
                          f"{r.why}); use a value in {r.low}..{r.high}")
