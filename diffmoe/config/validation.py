"""Validation of a :class:`~.schema.Config`: each value against what its key declares
(:func:`check_keys`), then the values against each other; one ``ConfigError`` line naming the
key and the fix."""

from __future__ import annotations

import dataclasses
import difflib
import math

import numpy as np

from ..errors import ConfigError
from ..paths import is_utf8
from .keys import flatten, keys_of
from .ranges import Interval, Range, check_int, check_real
from .schedule import REFERENCE_STEPS, beta_scale, linear_betas
from .schema import (
    AUTO,
    EITHER_DATASETS,
    FOLDER_CHANNELS,
    SAMPLERS_BY_OBJECTIVE,
    TEXT_DATASETS,
    Config,
    DataConfig,
    ModelConfig,
    MoEConfig,
    ObjectiveConfig,
    SampleConfig,
    TrainConfig,
    quote,
)

# A DDPM schedule must keep alpha_bar at its last step above this: respacing derives
# beta' = 1 - alpha_bar_t / alpha_bar_prev, which rounds to 1 in float64 below it.
MIN_ALPHA_BAR = 1e-12
# What W&B refuses in a project name (wandb.Settings.validate_project), checked before any work.
WANDB_PROJECT_FORBIDDEN = ("/", "\\", "#", "?", "%", ":")
WANDB_PROJECT_MAX = 128


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key}={quote(value)} is not one of {list(choices)}{hint}")


def check_keys(section: object, prefix: str = "") -> None:
    """Each value of ``section`` (and of its nested sections) against its key's declaration: a
    float finite (no setting means anything at NaN or infinity), a text valid UTF-8 (a name in
    another encoding reaches Python as lone surrogates, which no log, YAML, JSON or tokenizer can
    hold), and within the key's check: its range or bounds, or one of its choices."""
    values = flatten(dataclasses.asdict(section), prefix)
    for key in keys_of(type(section), prefix):
        value = values[key.name]
        for item in value if isinstance(value, list) else [value]:
            _check(key.name, item, key.check)


def _check(name: str, value: object, check: object) -> None:
    if isinstance(value, float):
        _require(math.isfinite(value), f"{name}={value} must be a finite number")
    if isinstance(value, str):
        _require(is_utf8(value), f"{name} {quote(value)} is not valid UTF-8; write it in UTF-8 "
                 f"(rename a file or folder whose name is not)")
    if isinstance(check, Range):
        check_int(name, value, check)
    elif isinstance(check, Interval):
        check_real(name, value, check)
    elif isinstance(check, tuple):
        _choice(name, value, check)


def resolve_sampler(objective: str, sampler: str, name: str = "sample.sampler") -> str:
    """The sampler that ``sampler`` (the value of the setting ``name``) means for the objective:
    ``auto`` is the first of the objective's samplers; a sampler of another objective is an
    error."""
    names = SAMPLERS_BY_OBJECTIVE[objective]
    if sampler == AUTO:
        return names[0]
    _require(sampler in names, f"{name}={quote(sampler)} is not available for objective.type="
             f"{objective}; choose one of {list(names)} (or {AUTO})")
    return sampler


def validate(cfg: Config) -> None:
    """Every value against its key's declaration, then the keys against each other."""
    check_keys(cfg)
    validate_model(cfg.model)
    validate_moe(cfg.model)
    validate_data(cfg.data)
    validate_folder(cfg)
    validate_text(cfg)
    validate_train(cfg.train)
    validate_objective(cfg.objective, cfg.model)
    validate_sampling(cfg.objective, cfg.sample, cfg.model)
    validate_inference_mode(cfg.model.moe, cfg.sample)
    validate_pool_scope(cfg)


def validate_model(m: ModelConfig) -> None:
    """The backbone's shape (the MoE layers: :func:`validate_moe`)."""
    _require(m.input_size % m.patch_size == 0,
             f"model.input_size={m.input_size} is not divisible by model.patch_size="
             f"{m.patch_size}; choose a patch size that divides the input size")
    _require(m.hidden_size % m.num_heads == 0,
             f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads="
             f"{m.num_heads}; choose a head count that divides the width")


def validate_moe(m: ModelConfig) -> None:
    """``model.moe``, against the FFN width it splits into experts."""
    moe = m.moe
    _require(moe.type == "diffmoe" or moe.pool_scope == "batch",
             f"model.moe.pool_scope={moe.pool_scope} applies only to model.moe.type=diffmoe "
             f"(expert_choice always chooses within each sample); drop it")
    if moe.type == "dense":
        return
    _require(moe.type == "token_choice" or moe.capacity <= moe.num_experts,
             f"model.moe.capacity={moe.capacity} is more than model.moe.num_experts="
             f"{moe.num_experts}: each expert would take more tokens than there are; use at "
             f"most {moe.num_experts} (every expert on every token)")
    hidden = m.mlp_ratio * m.hidden_size
    _require(hidden % moe.granularity == 0,
             f"model.moe.granularity={moe.granularity} does not divide the FFN width "
             f"{hidden:g}; pick a granularity that divides mlp_ratio * hidden_size")
    if moe.type == "token_choice":
        routed = moe.num_experts * moe.granularity
        _require(float(moe.capacity * moe.granularity).is_integer()
                 and moe.capacity * moe.granularity <= routed,
                 f"model.moe.capacity={moe.capacity} with token_choice is the number of "
                 f"experts per token (times granularity) and must be a whole number "
                 f"<= {routed}; use e.g. 1 or 2")


def validate_data(d: DataConfig) -> None:
    _require(d.name != "latents" or bool(d.path) or d.scale_factor > 0,
             "data.name=latents needs data.path, the directory written by diffmoe cache-latents "
             "(or, for a model that only samples, data.scale_factor: its latent normalisation)")
    _require(d.shift_factor == 0 or d.scale_factor > 0,
             f"data.shift_factor={d.shift_factor} is set without data.scale_factor; set both, or "
             f"neither to take the latent cache's")
    _require(d.name == "latents" or (d.scale_factor == 0 and d.downsampling == 0),
             f"data.scale_factor and data.downsampling describe latents, but data.name="
             f"{d.name}; drop them or set data.name=latents")
    _require(d.name != "folder" or bool(d.path),
             "data.name=folder needs data.path, a directory of images in class subfolders or "
             "with a metadata.jsonl of captions")
    _require(not (d.flip and d.name == "latents"),
             "data.flip=true applies to pixel-space data; a latent cache already feeds each "
             "image or its flip at random, so drop data.flip")


def validate_folder(cfg: Config) -> None:
    """A folder of images becomes 1-channel (grey) or 3-channel (RGB) pixels."""
    if cfg.data.name == "folder":
        c = cfg.model.in_channels
        _require(c in FOLDER_CHANNELS,
                 f"model.in_channels={c}, but data.name=folder gives 1-channel (grey) or "
                 f"3-channel (RGB) images; set model.in_channels=1 or 3")


def validate_train(t: TrainConfig) -> None:
    _require(bool(t.out_dir), "train.out_dir may not be empty")
    _require(t.batch_size % t.grad_accum == 0,
             f"train.batch_size={t.batch_size} is not divisible by train.grad_accum="
             f"{t.grad_accum}; pick a batch size that is a multiple of it")
    _require(len(set(t.trackers)) == len(t.trackers),
             f"train.trackers={t.trackers} names a tracker twice; name each once")
    bad = [c for c in WANDB_PROJECT_FORBIDDEN if c in t.wandb_project]
    _require(0 < len(t.wandb_project) <= WANDB_PROJECT_MAX and not bad,
             f"train.wandb_project={quote(t.wandb_project)} is no W&B project name (empty, over "
             f"{WANDB_PROJECT_MAX} characters, or holding one of "
             f"{' '.join(WANDB_PROJECT_FORBIDDEN)}); name it e.g. diffmoe")


def validate_objective(o: ObjectiveConfig, m: ModelConfig) -> None:
    if o.type == "flow":
        return
    _require(o.time_sampling == "uniform",
             f"objective.time_sampling={o.time_sampling} is for the flow objective; DDPM draws "
             f"its integer timesteps uniformly; drop it or use objective.type=flow")
    _require(0 < o.beta_start <= o.beta_end and o.beta_end * beta_scale(o.num_timesteps) < 1,
             f"objective.beta_start={o.beta_start}, beta_end={o.beta_end} must satisfy "
             f"0 < beta_start <= beta_end and beta_end * {REFERENCE_STEPS}/num_timesteps < 1 "
             f"(DiT: 1e-4 and 0.02)")
    betas = linear_betas(o.num_timesteps, o.beta_start, o.beta_end)
    alpha_bar_end = float(np.prod(1.0 - betas))
    _require(alpha_bar_end > MIN_ALPHA_BAR,
             f"objective.beta_end={o.beta_end} leaves alpha_bar={alpha_bar_end:.1e} at the last "
             f"timestep, too close to 0 for respaced sampling; lower beta_end (DiT: 0.02)")


def validate_sample(s: SampleConfig) -> None:
    """The ``sample`` section on its own: each setting as its key declares. Run (through
    :func:`validate_sampling`) on every settings object before anything is sampled, and on the
    variants a sweep or an analysis derives from it."""
    check_keys(s, "sample.")


def validate_sampling(o: ObjectiveConfig, s: SampleConfig, m: ModelConfig) -> None:
    """The ``sample`` section, and against the objective and model; also run on the settings a
    checkpoint is sampled with (its own, updated with command-line options)."""
    validate_sample(s)
    resolve_sampler(o.type, s.sampler)
    if o.type == "ddpm":
        _require(s.steps <= o.num_timesteps,
                 f"sample.steps={s.steps} respaces the DDPM schedule to more steps than its "
                 f"{o.num_timesteps} (objective.num_timesteps); use at most {o.num_timesteps}")
    _require(0 <= s.guidance_channels <= m.in_channels,
             f"sample.guidance_channels={s.guidance_channels} must be in 0..{m.in_channels} "
             f"(0 = all channels; DiT's legacy behaviour is 3)")


def validate_inference_mode(moe: MoEConfig, s: SampleConfig) -> None:
    """A configured ``sample.mode`` that needs a capacity predictor only with DiffMoE layers (a
    loaded model is checked by ``sample.resolve_routing``)."""
    if moe.type != "diffmoe":
        _require(s.mode in ("auto", "static"),
                 f"sample.mode={s.mode} needs a capacity predictor, which only model.moe.type="
                 f"diffmoe has; use sample.mode=static (or auto)")


def validate_pool_scope(cfg: Config) -> None:
    """A per-sample pool has nothing to gather across ranks."""
    _require(not (cfg.model.moe.pool_scope == "sample" and cfg.train.token_pool == "global"),
             "train.token_pool=global does nothing with model.moe.pool_scope=sample (experts "
             "choose within each sample, so there is no pool to gather across ranks); drop it")


def validate_text(cfg: Config) -> None:
    """The condition and the dataset agree."""
    m = cfg.model
    captioned = cfg.data.name in TEXT_DATASETS
    either = cfg.data.name in EITHER_DATASETS  # checked when the data is opened
    if m.condition == "text" and not (captioned or either):
        raise ConfigError(f"model.condition=text needs a captioned dataset, but data.name="
                          f"{cfg.data.name}; use data.name=shapes, emoji, or folder with a "
                          f"metadata.jsonl of captions")
    if m.condition == "class" and captioned:
        raise ConfigError(f"data.name={cfg.data.name} has captions, not class labels; set "
                          f"model.condition=text")
