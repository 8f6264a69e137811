"""Sampling from a model or a checkpoint: batched generation with capacity accounting.

DiffMoE's inference depends on the sampling batch, since tokens of all samples in a batch compete
in one pool (paper §4): ``batch_size`` is a real setting, recorded with the results.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm import tqdm

from .capacity import CapacityMeter, activated_params
from .checkpoint import LoadedCheckpoint, load_state_dict_checked, open_checkpoint
from .config import WEIGHTS, Config, SampleConfig, config_from_dict, validate_sampling
from .data import sample_decoder
from .device import autocast, resolve_device, use_tf32
from .diffusion import Objective, SamplerOptions, build_objective, resolve_sampler, sample
from .errors import CheckpointError, ConfigError, DiffMoEError
from .fileio import write_json
from .images import GRID_COLUMNS, save_grid
from .models import DiT, build_model
from .models.condition import TextCondition
from .models.moe import Routing, diffmoe_layers

log = logging.getLogger(__name__)

Condition = Union[Tensor, TextCondition]  # class labels, or a batch of encoded captions

# The sampling settings that act only under some other setting: for each, the command-line
# option that turns it on, and whether resolved settings (the sampler no longer ``auto``) use it.
# Given where it does nothing it is refused; left to the checkpoint's config there, it is not
# recorded as used.
CONDITIONAL_SETTINGS: dict[str, tuple[str, Callable[[SampleConfig], bool]]] = {
    "threshold": ("--mode threshold", lambda s: s.mode == "threshold"),
    "ddim_eta": ("--sampler ddim", lambda s: s.sampler == "ddim"),
    "ode_rtol": ("--sampler dopri5", lambda s: s.sampler == "dopri5"),
    "ode_atol": ("--sampler dopri5", lambda s: s.sampler == "dopri5"),
    "sde_noise": ("--sampler sde", lambda s: s.sampler == "sde"),
    "guidance_channels": ("--cfg-scale other than 1", lambda s: s.cfg_scale != 1),
}


def option_name(setting: str) -> str:
    """The command-line option of a sampling setting: ``ddim_eta`` → ``--ddim-eta``."""
    return "--" + setting.replace("_", "-")


def check_applicable(overrides: dict, s: SampleConfig) -> None:
    """Refuse a setting given in ``overrides`` that the resolved settings ``s`` do not use (a
    threshold without threshold mode, a DDIM eta for another sampler, ...), and a sampling
    batch larger than the number of images asked for."""
    for name, (needs, applies) in CONDITIONAL_SETTINGS.items():
        if name in overrides and not applies(s):
            raise ConfigError(f"{option_name(name)} does nothing here: it applies only with "
                              f"{needs} (these settings: sampler {s.sampler}, mode {s.mode}, "
                              f"cfg scale {s.cfg_scale:g}); drop it or add {needs}")
    if "batch_size" in overrides and s.batch_size > s.num:
        raise ConfigError(f"--batch-size {s.batch_size} is larger than the {s.num} images to "
                          f"draw, so no batch would be that large; use --batch-size {s.num} or "
                          f"less, or draw more images")


def recorded_settings(s: SampleConfig, mode: str) -> dict:
    """The settings a result records: ``s`` with the routing ``mode`` it resolved to, without the
    conditional settings it did not use (:data:`CONDITIONAL_SETTINGS`)."""
    used = replace(s, mode=mode)
    return {k: v for k, v in asdict(used).items()
            if k not in CONDITIONAL_SETTINGS or CONDITIONAL_SETTINGS[k][1](used)}


def nonfinite_tensors(tensors: dict[str, Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``tensors`` that hold a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def summary_path(image: str | Path) -> Path:
    """The JSON summary ``diffmoe sample`` writes beside the PNG grid ``image``."""
    return Path(image).with_suffix(".json")


def resolve_routing(model: DiT, settings: SampleConfig) -> Routing:
    """The MoE routing that ``settings`` ask of ``model``: ``auto`` → the model's
    ``default_routing`` (dynamic for a DiffMoE model, static otherwise). Dynamic and threshold
    modes need DiffMoE's capacity predictor, and so does ``predictor``."""
    has_predictor = bool(diffmoe_layers(model))
    mode = settings.mode
    if mode == "auto":
        mode = model.default_routing.mode
    if mode in ("dynamic", "threshold", "predictor") and not has_predictor:
        raise ConfigError(f"sample.mode={mode} needs a capacity predictor, but this model's FFN is "
                          f"'{model.cfg.moe.type}'; use --mode static")
    return Routing(mode, settings.threshold)


def capacity_warnings(model: DiT, routing: Routing, batch_size: int, c_avg: float) -> list[str]:
    """Settings that work but are probably not what was meant: a DiffMoE token pool of a single
    image, and a threshold under which no expert or every expert processes every token."""
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
        lower, higher = "lower --threshold", "raise --threshold"
    else:
        lower = higher = ("the learned thresholds do not fit this model yet: train longer, or "
                          "set one with --mode threshold --threshold G")
    if c_avg == 0.0:
        found.append(f"no expert selected any token (C_avg_infer 0, mode {routing.mode}): the MoE "
                     f"layers added nothing; {lower}")
    elif c_avg >= experts:
        found.append(f"every expert selected every token (C_avg_infer {c_avg:g}, {experts}x the "
                     f"dense compute, mode {routing.mode}); {higher}")
    return found


BATCH_SEED_STRIDE = 2**32  # seed · stride + batch index: one noise stream per sampling batch


def batch_seed(seed: int, batch: int) -> int:
    """The seed of sampling batch ``batch``'s noise: a batch draws the same noise whichever
    process samples it, and whatever batches come before it."""
    return seed * BATCH_SEED_STRIDE + batch


def generate_batches(model: DiT, objective: Objective, condition: Condition,
                     settings: SampleConfig, *, progress: bool = True,
                     meter: Optional[CapacityMeter] = None,
                     batches: Optional[Sequence[int]] = None,
                     generator: Optional[torch.Generator] = None
                     ) -> Iterator[tuple[Tensor, Condition]]:
    """Generate one image per entry of ``condition`` (class labels or a text condition),
    ``settings.batch_size`` at a time, yielding (images in [-1, 1] on the CPU, their condition)
    per batch, so a caller can consume them without keeping them all; ``batches`` picks which
    batches (by index, e.g. one process's share), all of them by default. Each batch's noise
    comes from :func:`batch_seed`, or, if given, from ``generator`` (on the model's device),
    drawn batch after batch. The routing comes from :func:`resolve_routing` and the sampler
    options from the same ``settings``, whose ranges ``config.validate_sampling`` has checked;
    the model runs under ``settings.precision`` and, with ``settings.compile``, compiled. Every
    forward is reported to ``meter`` if given."""
    routing = resolve_routing(model, settings)
    options = SamplerOptions.from_settings(settings)
    on_forward = meter.on_forward if meter is not None else None
    device = next(model.parameters()).device
    net = torch.compile(model) if settings.compile else model
    size = settings.batch_size
    total = -(-condition.shape[0] // size)
    if batches is None:
        batches = range(total)
    was_training = model.training
    model.eval()
    try:
        for b in tqdm(batches, disable=not progress, desc="sample", dynamic_ncols=True):
            y = condition[b * size:(b + 1) * size]
            gen = generator or torch.Generator(device=device).manual_seed(
                batch_seed(settings.seed, b))
            with autocast(settings.precision, device):
                images = sample(net, objective, y.to(device), sampler=settings.sampler,
                                steps=settings.steps, cfg_scale=settings.cfg_scale,
                                routing=routing, generator=gen, on_forward=on_forward,
                                options=options)
            if not bool(torch.isfinite(images).all()):
                raise DiffMoEError(
                    f"sampling batch {b + 1} of {total} came out non-finite (NaN or "
                    f"inf), so nothing is written; the settings are unstable for this model "
                    f"(lower --cfg-scale or --sde-noise, raise --steps) or its weights are "
                    f"damaged")
            yield images.float().cpu(), y
    finally:
        model.train(was_training)


def generate(model: DiT, objective: Objective, condition: Condition, settings: SampleConfig, *,
             progress: bool = True, meter: Optional[CapacityMeter] = None,
             generator: Optional[torch.Generator] = None) -> tuple[Tensor, CapacityMeter]:
    """Generate one image per entry of ``condition`` with ``settings`` (see
    :func:`generate_batches`). Returns images in [-1, 1] (on the CPU) and the capacity meter that
    recorded every forward."""
    meter = meter if meter is not None else CapacityMeter()
    chunks = [images for images, _ in generate_batches(model, objective, condition, settings,
                                                       progress=progress, meter=meter,
                                                       generator=generator)]
    return torch.cat(chunks), meter


def load_model(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu"
               ) -> tuple[DiT, dict, Path]:
    """Build the model a checkpoint was trained with and load its ``ema`` or ``raw`` weights.
    ``path`` may be a checkpoint or a run directory (its newest intact checkpoint)."""
    ckpt = open_checkpoint(path)
    return model_from_checkpoint(ckpt, weights, device), ckpt.state, ckpt.path


def checkpoint_config(ckpt: LoadedCheckpoint) -> Config:
    """The config a checkpoint was trained with (validated)."""
    try:
        return config_from_dict(ckpt.state["config"])
    except (KeyError, TypeError):
        raise CheckpointError(f"checkpoint '{ckpt.path}' has no usable config in state.json; it "
                              f"is damaged") from None


def model_from_checkpoint(ckpt: LoadedCheckpoint, weights: str = "ema",
                          device: str | torch.device = "cpu") -> DiT:
    if weights not in WEIGHTS:
        raise ConfigError(f"weights '{weights}' must be one of {list(WEIGHTS)}")
    model = build_model(checkpoint_config(ckpt).model)
    tensors = ckpt.tensors("ema" if weights == "ema" else "model")
    bad = nonfinite_tensors(tensors)
    if bad:
        raise CheckpointError(f"checkpoint '{ckpt.path}' holds NaN or inf in {len(bad)} of its "
                              f"{weights} tensors (first: {bad[0]}); use an earlier checkpoint "
                              f"of the run")
    load_state_dict_checked(model, tensors, f"'{ckpt.path}'")
    return model.to(device).eval()


def load_for_sampling(path: str | Path, overrides: dict, device: str | torch.device = "auto"
                      ) -> tuple[LoadedCheckpoint, SampleConfig, DiT, Objective]:
    """A checkpoint (or a run's newest) ready to sample: its ``sample`` settings updated with
    ``overrides`` and checked against its objective and model before any weights are read, the
    model with the chosen weights on ``device`` (a name: ``auto``, ``cpu`` or ``cuda``, or a
    torch device), and the objective. ``auto`` in the returned settings is resolved to the
    sampler it stands for, as results should record it."""
    device = resolve_device(device, "--device")
    ckpt = open_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    s = sampling_settings(cfg, overrides)
    use_tf32(device, s.tf32)
    return ckpt, s, model_from_checkpoint(ckpt, s.weights, device), build_objective(cfg)


def sampling_settings(cfg: Config, overrides: dict) -> SampleConfig:
    """``cfg.sample`` updated with ``overrides`` and checked against the objective and model
    (``config.validate_sampling``), with ``auto`` resolved to the sampler it stands for."""
    try:
        s = replace(cfg.sample, **overrides)
    except TypeError as exc:
        raise ConfigError(f"bad sample settings ({exc}); check the options") from None
    validate_sampling(cfg.objective, s, cfg.model)
    s = replace(s, sampler=resolve_sampler(cfg.objective.type, s.sampler))
    check_applicable(overrides, s)
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


def sample_checkpoint(path: str | Path, overrides: dict, out: str | Path,
                      labels: Optional[str] = None, device: str | torch.device = "auto",
                      measure: Optional[Callable[[Tensor, Tensor], dict]] = None,
                      vae: Any = None) -> dict:
    """The ``diffmoe sample`` command: a PNG grid at ``out`` and a JSON summary beside it
    (:func:`summary_path`; the caller has checked both may be written). Settings are the
    checkpoint's ``sample`` config updated with ``overrides``. ``measure(images, labels)``, if
    given, reads the samples (in [-1, 1]) and returns entries for the summary (``diffmoe sample
    --judge``: the MNIST judge's class consistency). ``vae`` (a folder) decodes a latent model's
    samples instead of the VAE its config names."""
    device = resolve_device(device, "--device")
    ckpt, s, model, objective = load_for_sampling(path, overrides, device)
    source = SampledModel(model, objective, config_from_dict(ckpt.state["config"]), ckpt.path,
                          ckpt.state["step"], vae)
    return sample_grid(source, s, out, labels, device, measure)


@dataclass
class SampledModel:
    """What a grid is drawn from: the model, its objective and config, where it was read from
    (a checkpoint or a folder) and its training steps, and the VAE that overrides its own."""

    model: DiT
    objective: Objective
    config: Config
    path: Path
    step: int
    vae: Any = None


def sample_grid(source: SampledModel, s: SampleConfig, out: str | Path,
                labels: Optional[str], device: torch.device,
                measure: Optional[Callable[[Tensor, Tensor], dict]] = None) -> dict:
    """The grid and summary of :func:`sample_checkpoint`, from a loaded model with resolved
    settings ``s``; a latent model's VAE is found (or its absence reported) before sampling."""
    out, model, cfg = Path(out), source.model, source.model.cfg
    routing = resolve_routing(model, s)
    y = parse_labels(labels, s.num, cfg.num_classes, s.seed)
    decoder = sample_decoder(asdict(source.config.data), device, source.vae, cfg.in_channels)
    images, meter = generate(model, source.objective, y, s)
    if decoder is not None:  # a latent model: decode with its VAE
        images = decoder(images)
    nrow = (GRID_COLUMNS if cfg.num_classes >= GRID_COLUMNS and s.num % GRID_COLUMNS == 0
            else None)
    save_grid(images, out, nrow=nrow, upscale=2)
    cap = meter.summary()
    for warning in capacity_warnings(model, routing, s.batch_size, cap["c_avg_infer"]):
        log.warning("%s", warning)
    summary = {
        "checkpoint": str(source.path), "step": source.step, "image": str(out),
        "settings": recorded_settings(s, routing.mode), "labels": y.tolist(),
        "c_avg_infer": cap["c_avg_infer"], "capacity_per_layer": cap["per_layer"],
        "activated_params": activated_params(model, cap["c_avg_infer"]),
        "total_params": model.num_params(),
        **(measure(images, y) if measure is not None else {}),
    }
    write_json(summary_path(out), summary)
    return summary
