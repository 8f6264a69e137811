"""Sampling from a model or a checkpoint: batched generation with capacity accounting.

DiffMoE's inference depends on the sampling batch, since tokens of all samples in a batch compete
in one pool (paper §4): ``batch_size`` is a real setting, recorded with the results.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .capacity import CapacityMeter
from .config import Config, SampleConfig, validate_sampling
from .device import autocast
from .diffusion import Objective, SamplerOptions, resolve_sampler, sample
from .diffusion.samplers import Generators
from .errors import ConfigError, DiffMoEError
from .models import DiT
from .models.condition import Condition
from .models.moe import Routing, diffmoe_layers

log = logging.getLogger(__name__)

class Spelling(Protocol):
    """How the caller names a sampling setting (and a value of it) in messages: the command's
    options (:func:`option_name`) or the pipeline's arguments."""

    def __call__(self, setting: str, value: Any = None) -> str: ...


def option_name(setting: str, value: Any = None) -> str:
    """The command-line option of a sampling setting: ``ddim_eta`` → ``--ddim-eta``, and with a
    value ``--sampler ddim``."""
    option = "--" + setting.replace("_", "-")
    return option if value is None else f"{option} {value}"


# The sampling settings that act only under some other setting: for each, the setting (and
# value) that turns it on, and whether resolved settings (the sampler no longer ``auto``) use it.
# Given where it does nothing it is refused; left to the checkpoint's config there, it is not
# recorded as used.
CONDITIONAL_SETTINGS: dict[str, tuple[Callable[[Spelling], str],
                                      Callable[[SampleConfig], bool]]] = {
    "threshold": (lambda n: n("mode", "threshold"), lambda s: s.mode == "threshold"),
    "ddim_eta": (lambda n: n("sampler", "ddim"), lambda s: s.sampler == "ddim"),
    "ode_rtol": (lambda n: n("sampler", "dopri5"), lambda s: s.sampler == "dopri5"),
    "ode_atol": (lambda n: n("sampler", "dopri5"), lambda s: s.sampler == "dopri5"),
    "sde_noise": (lambda n: n("sampler", "sde"), lambda s: s.sampler == "sde"),
    "guidance_channels": (lambda n: f"{n('cfg_scale')} other than 1",
                          lambda s: s.cfg_scale != 1),
}


def check_applicable(overrides: dict, s: SampleConfig, name: Spelling = option_name) -> None:
    """Refuse a setting given in ``overrides`` that the resolved settings ``s`` do not use (a
    threshold without threshold mode, a DDIM eta for another sampler, ...), and a sampling
    batch larger than the number of images asked for; settings named as ``name`` spells them."""
    for setting, (needs, applies) in CONDITIONAL_SETTINGS.items():
        if setting in overrides and not applies(s):
            raise ConfigError(f"{name(setting)} does nothing here: it applies only with "
                              f"{needs(name)} (these settings: sampler {s.sampler}, mode "
                              f"{s.mode}, cfg scale {s.cfg_scale:g}); drop it or add "
                              f"{needs(name)}")
    if "batch_size" in overrides and s.batch_size > s.num:
        raise ConfigError(f"{name('batch_size', s.batch_size)} is larger than the {s.num} "
                          f"images to draw, so no batch would be that large; use "
                          f"{name('batch_size', s.num)} or less, or draw more images")


def recorded_settings(s: SampleConfig, mode: str) -> dict:
    """The settings a result records: ``s`` with the routing ``mode`` it resolved to, without the
    conditional settings it did not use (:data:`CONDITIONAL_SETTINGS`)."""
    used = replace(s, mode=mode)
    return {k: v for k, v in asdict(used).items()
            if k not in CONDITIONAL_SETTINGS or CONDITIONAL_SETTINGS[k][1](used)}


def summary_path(image: str | Path) -> Path:
    """The JSON summary ``diffmoe sample`` writes beside the PNG grid ``image``."""
    return Path(image).with_suffix(".json")


def resolve_routing(model: DiT, settings: SampleConfig, name: Optional[Spelling] = None
                    ) -> Routing:
    """The MoE routing that ``settings`` ask of ``model``: ``auto`` → the model's
    ``default_routing`` (dynamic for a DiffMoE model, static otherwise). Dynamic and threshold
    modes need DiffMoE's capacity predictor, and so does ``predictor`` (refused in the words of
    ``name``: the config's ``sample.mode`` by default)."""
    has_predictor = bool(diffmoe_layers(model))
    mode = settings.mode
    if mode == "auto":
        mode = model.default_routing.mode
    if mode in ("dynamic", "threshold", "predictor") and not has_predictor:
        given = f"sample.mode={mode}" if name is None else name("mode", mode)
        static = option_name("mode", "static") if name is None else name("mode", "static")
        raise ConfigError(f"{given} needs a capacity predictor, but this model's FFN is "
                          f"'{model.cfg.moe.type}'; use {static}")
    return Routing(mode, settings.threshold)


def capacity_warnings(model: DiT, routing: Routing, batch_size: int, c_avg: float,
                      name: Spelling = option_name) -> list[str]:
    """Settings that work but are probably not what was meant: a DiffMoE token pool of a single
    image, and a threshold under which no expert or every expert processes every token
    (settings named as ``name`` spells them)."""
    if not diffmoe_layers(model):
        return []
    found = []
    if batch_size == 1 and routing.mode != "predictor":
        found.append("sampling batch size 1: DiffMoE's token pool holds a single image (two with "
                     "guidance), so its tokens compete only with each other; the paper samples "
                     "at batch 75-125")
    if routing.mode == "static":
        return found
    experts = model.cfg.moe.num_experts
    if routing.mode == "threshold":
        lower, higher = f"lower {name('threshold')}", f"raise {name('threshold')}"
    else:
        lower = higher = ("the learned thresholds do not fit this model yet: train longer, or "
                          f"set one with {name('mode', 'threshold')} and a {name('threshold')} "
                          f"in (0, 1)")
    if c_avg == 0.0:
        found.append(f"no expert selected any token (C_avg_infer 0, mode {routing.mode}): the MoE "
                     f"layers added nothing; {lower}")
    elif c_avg >= experts:
        found.append(f"every expert selected every token (C_avg_infer {c_avg:g}, {experts}x the "
                     f"dense compute, mode {routing.mode}); {higher}")
    return found


# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed: seeds that differ above
# them draw the same noise. Batch seeds are therefore taken below 2**32.
SEED_BITS = 32
# 2**64 divided by the golden ratio: a multiplicative hash that spreads consecutive seeds far
# apart on the circle of 2**32 batch seeds (Knuth's Fibonacci hashing).
SEED_SPREAD = 0x9E3779B97F4A7C15


def batch_seed(seed: int, batch: int) -> int:
    """The seed of sampling batch ``batch``'s noise: a batch draws the same noise whichever
    process samples it, and whatever batches come before it. Seed ``seed``'s batches take
    consecutive seeds from a start spread by :data:`SEED_SPREAD` (seed 0's are 0, 1, 2, ...),
    all below 2**32, so every seed draws its own noise on the CPU too."""
    start = (seed * SEED_SPREAD) % 2**64 >> (64 - SEED_BITS)
    return (start + batch) % 2**SEED_BITS


def generate_batches(model: DiT, objective: Objective, condition: Condition,
                     settings: SampleConfig, *, progress: bool = True,
                     meter: Optional[CapacityMeter] = None,
                     batches: Optional[Sequence[int]] = None,
                     generator: Optional[Generators] = None,
                     noise: Optional[Tensor] = None
                     ) -> Iterator[tuple[Tensor, Condition]]:
    """Generate one image per entry of ``condition`` (class labels or a text condition),
    ``settings.batch_size`` at a time, yielding (images in [-1, 1] on the CPU, their condition)
    per batch, so a caller can consume them without keeping them all; ``batches`` picks which
    batches (by index, e.g. one process's share), all of them by default. Each batch's noise
    comes from :func:`batch_seed`, or, if given, from ``generator`` (on the model's device):
    one generator drawn batch after batch, or a list of one per image; ``noise`` (one starting
    noise per image) replaces the first draw. The routing comes from :func:`resolve_routing`
    and the sampler options from the same ``settings``, whose ranges
    ``config.validate_sampling`` has checked; the model runs under ``settings.precision`` and,
    with ``settings.compile``, compiled. Every forward is reported to ``meter`` if given;
    ``progress`` shows a bar over the denoising steps of all batches."""
    routing = resolve_routing(model, settings)
    options = SamplerOptions.from_settings(settings)
    on_forward = meter.on_forward if meter is not None else None
    device = next(model.parameters()).device
    net = torch.compile(model) if settings.compile else model
    size = settings.batch_size
    total = -(-condition.shape[0] // size)
    if batches is None:
        batches = range(total)
    # dopri5 chooses its steps: its bar counts model evaluations, without a total.
    steps = None if settings.sampler == "dopri5" else settings.steps * len(batches)
    bar = tqdm(total=steps, disable=not progress, desc="denoising steps", dynamic_ncols=True,
               unit="step")
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            rows = slice(b * size, (b + 1) * size)
            y = condition[rows]
            if generator is None:
                gen = torch.Generator(device=device).manual_seed(batch_seed(settings.seed, b))
            else:
                gen = generator if isinstance(generator, torch.Generator) else generator[rows]
            with autocast(settings.precision, device):
                images = sample(net, objective, y.to(device), sampler=settings.sampler,
                                steps=settings.steps, cfg_scale=settings.cfg_scale,
                                routing=routing, generator=gen, on_forward=on_forward,
                                options=options, on_step=bar.update,
                                noise=None if noise is None else noise[rows])
            if not bool(torch.isfinite(images).all()):
                raise DiffMoEError(
                    f"sampling batch {b + 1} of {total} came out non-finite (NaN or "
                    f"inf), so nothing is written; the settings are unstable for this model "
                    f"(lower --cfg-scale or --sde-noise, raise --steps) or its weights are "
                    f"damaged")
            yield images.float().cpu(), y
    finally:
        bar.close()
        model.train(was_training)


def generate(model: DiT, objective: Objective, condition: Condition, settings: SampleConfig, *,
             progress: bool = True, meter: Optional[CapacityMeter] = None,
             generator: Optional[Generators] = None, noise: Optional[Tensor] = None
             ) -> tuple[Tensor, CapacityMeter]:
    """Generate one image per entry of ``condition`` with ``settings`` (see
    :func:`generate_batches`). Returns images in [-1, 1] (on the CPU) and the capacity meter that
    recorded every forward."""
    meter = meter if meter is not None else CapacityMeter()
    chunks = [images for images, _ in generate_batches(model, objective, condition, settings,
                                                       progress=progress, meter=meter,
                                                       generator=generator, noise=noise)]
    return torch.cat(chunks), meter


def sampling_settings(cfg: Config, overrides: dict, name: Spelling = option_name
                      ) -> SampleConfig:
    """``cfg.sample`` updated with ``overrides`` and checked against the objective and model
    (``config.validate_sampling``), with ``auto`` resolved to the sampler it stands for; a
    setting that does nothing under the others is refused in the words of ``name``."""
    try:
        s = replace(cfg.sample, **overrides)
    except TypeError as exc:
        raise ConfigError(f"bad sample settings ({exc}); check the options") from None
    validate_sampling(cfg.objective, s, cfg.model)
    s = replace(s, sampler=resolve_sampler(cfg.objective.type, s.sampler))
    check_applicable(overrides, s, name)
    return replace(s, batch_size=min(s.batch_size, s.num))


def parse_labels(spec: Optional[str], num: int, num_classes: int, seed: int) -> Tensor:
    """``None``/"balanced": 0, 1, 2, ... cycling over classes; "random": uniform with ``seed``;
    otherwise a comma-separated list cycled to ``num``."""
    if spec in (None, "", "balanced"):
        return torch.arange(num) % num_classes
    if spec == "random":
        return torch.randint(0, num_classes, (num,), generator=torch.Generator().manual_seed(seed))
    try:
        values = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--labels '{spec}' must be 'balanced', 'random' or integers like "
                          f"3,1,4") from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise ConfigError(f"--labels: class {bad[0]} is outside 0..{num_classes - 1}")
    if len(values) > num:
        raise ConfigError(f"--labels names {len(values)} classes but only {num} images are "
                          f"drawn, so the last {len(values) - num} would be dropped; name at "
                          f"most {num} or draw more images")
    return torch.tensor(values).repeat(-(-num // len(values)))[:num]
