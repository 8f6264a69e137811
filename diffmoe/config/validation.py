"""Validation of a :class:`~.schema.Config`: each value against its range and the values against
each other, one ``ConfigError`` line naming the key and the fix."""

from __future__ import annotations

import dataclasses
import difflib
import math

import numpy as np

from ..errors import ConfigError
from ..paths import is_utf8
from .ranges import CONFIG_RANGES, check_int
from .schedule import REFERENCE_STEPS, beta_scale, linear_betas
from .schema import (
    AUTO,
    CONDITIONS,
    DATASETS,
    DEVICES,
    DISPATCH_KERNELS,
    EITHER_DATASETS,
    EMA_BUFFER_RULES,
    FFN_TYPES,
    FOLDER_CHANNELS,
    INFERENCE_MODES,
    LR_SCHEDULES,
    NONFINITE_POLICIES,
    OBJECTIVES,
    PARALLEL,
    POOL_SCOPES,
    PRECISIONS,
    SAMPLERS,
    SAMPLERS_BY_OBJECTIVE,
    TEXT_DATASETS,
    TIME_SAMPLINGS,
    TOKEN_POOLS,
    TRACKERS,
    WEIGHTS,
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


def _in_range(section: object, prefix: str) -> None:
    """Every integer field of ``section`` (and of its nested sections) within its range
    (:data:`ranges.CONFIG_RANGES`)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _in_range(value, f"{prefix}{f.name}.")
        elif isinstance(value, int) and not isinstance(value, bool):
            check_int(f"{prefix}{f.name}", value, CONFIG_RANGES[f"{prefix}{f.name}"])


def _finite(section: object, prefix: str) -> None:
    """Every float field of ``section`` (and of its nested sections) is a finite number: no
    setting of this project means anything at NaN or infinity."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            _require(math.isfinite(value), f"{prefix}{f.name}={value} must be a finite number")


def _utf8(section: object, prefix: str) -> None:
    """Every text field of ``section`` (and of its nested sections, and each item of a list)
    is valid UTF-8: a name in another encoding reaches Python as lone surrogates, which no log,
    YAML, JSON or tokenizer can hold."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _utf8(value, f"{prefix}{f.name}.")
            continue
        for text in value if isinstance(value, list) else [value]:
            _require(not isinstance(text, str) or is_utf8(text),
                     f"{prefix}{f.name} {quote(text)} is not valid UTF-8; write it in UTF-8 "
                     f"(rename a file or folder whose name is not)")


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
    """Every value finite, every integer in its range and every text UTF-8, every section on its
    own, then the sections against each other."""
    _finite(cfg, "")
    _in_range(cfg, "")
    _utf8(cfg, "")
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
    """The backbone's shape and its class condition (the MoE layers: :func:`validate_moe`)."""
    _choice("model.condition", m.condition, CONDITIONS)
    _require(m.input_size % m.patch_size == 0,
             f"model.input_size={m.input_size} is not divisible by model.patch_size="
             f"{m.patch_size}; choose a patch size that divides the input size")
    _require(m.hidden_size % m.num_heads == 0,
             f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads="
             f"{m.num_heads}; choose a head count that divides the width")
    _require(m.mlp_ratio > 0, f"model.mlp_ratio={m.mlp_ratio} must be positive")
    _require(0.0 <= m.class_dropout < 1.0,
             f"model.class_dropout={m.class_dropout} must be in [0, 1)")


def validate_moe(m: ModelConfig) -> None:
    """``model.moe``, against the FFN width it splits into experts."""
    moe = m.moe
    _choice("model.moe.type", moe.type, FFN_TYPES)
    _choice("model.moe.dispatch", moe.dispatch, DISPATCH_KERNELS)
    _choice("model.moe.pool_scope", moe.pool_scope, POOL_SCOPES)
    _require(moe.type == "diffmoe" or moe.pool_scope == "batch",
             f"model.moe.pool_scope={moe.pool_scope} applies only to model.moe.type=diffmoe "
             f"(expert_choice always chooses within each sample); drop it")
    _require(moe.capacity > 0, f"model.moe.capacity={moe.capacity} must be positive "
             f"(1.0 matches the dense model's compute)")
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
    _require(moe.router_init_std > 0, f"model.moe.router_init_std={moe.router_init_std} "
             f"must be positive")
    _require(0.0 <= moe.threshold_ema < 1.0,
             f"model.moe.threshold_ema={moe.threshold_ema} must be in [0, 1)")
    _require(moe.balance_loss_weight >= 0, "model.moe.balance_loss_weight must be >= 0")
    _require(moe.predictor_loss_weight >= 0, "model.moe.predictor_loss_weight must be >= 0")
    if moe.type == "token_choice":
        routed = moe.num_experts * moe.granularity
        _require(float(moe.capacity * moe.granularity).is_integer()
                 and moe.capacity * moe.granularity <= routed,
                 f"model.moe.capacity={moe.capacity} with token_choice is the number of "
                 f"experts per token (times granularity) and must be a whole number "
                 f"<= {routed}; use e.g. 1 or 2")


def validate_data(d: DataConfig) -> None:
    _choice("data.name", d.name, DATASETS)
    _require(d.name != "latents" or bool(d.path) or d.scale_factor > 0,
             "data.name=latents needs data.path, the directory written by diffmoe cache-latents "
             "(or, for a model that only samples, data.scale_factor: its latent normalisation)")
    _require(d.scale_factor >= 0, f"data.scale_factor={d.scale_factor} must be >= 0 (0 = the "
             f"latent cache's)")
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
    _require(d.in_memory_mb >= 0, f"data.in_memory_mb={d.in_memory_mb} must be >= 0 (0 = "
             f"always convert a folder to a cache)")


def validate_folder(cfg: Config) -> None:
    """A folder of images becomes 1-channel (grey) or 3-channel (RGB) pixels."""
    if cfg.data.name == "folder":
        c = cfg.model.in_channels
        _require(c in FOLDER_CHANNELS,
                 f"model.in_channels={c}, but data.name=folder gives 1-channel (grey) or "
                 f"3-channel (RGB) images; set model.in_channels=1 or 3")


def validate_train(t: TrainConfig) -> None:
    _choice("train.ema_buffers", t.ema_buffers, EMA_BUFFER_RULES)
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _choice("train.device", t.device, DEVICES)
    _choice("train.nonfinite_loss", t.nonfinite_loss, NONFINITE_POLICIES)
    _choice("train.parallel", t.parallel, PARALLEL)
    _choice("train.fsdp_reduce_dtype", t.fsdp_reduce_dtype, PRECISIONS)
    _choice("train.token_pool", t.token_pool, TOKEN_POOLS)
    _require(t.lr > 0, f"train.lr={t.lr} must be positive")
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
    _require(t.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
    _require(0.0 <= t.ema_decay < 1.0, f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    _require(t.max_minutes >= 0, "train.max_minutes must be >= 0 (0 = no limit)")
    _require(t.dist_timeout_s > 0, f"train.dist_timeout_s={t.dist_timeout_s} must be positive "
             f"(seconds a rank waits for the others)")
    _require(bool(t.out_dir), "train.out_dir may not be empty")
    _require(t.batch_size % t.grad_accum == 0,
             f"train.batch_size={t.batch_size} is not divisible by train.grad_accum="
             f"{t.grad_accum}; pick a batch size that is a multiple of it")
    for name in t.trackers:
        _choice("train.trackers", name, TRACKERS)
    _require(len(set(t.trackers)) == len(t.trackers),
             f"train.trackers={t.trackers} names a tracker twice; name each once")
    bad = [c for c in WANDB_PROJECT_FORBIDDEN if c in t.wandb_project]
    _require(0 < len(t.wandb_project) <= WANDB_PROJECT_MAX and not bad,
             f"train.wandb_project={quote(t.wandb_project)} is no W&B project name (empty, over "
             f"{WANDB_PROJECT_MAX} characters, or holding one of "
             f"{' '.join(WANDB_PROJECT_FORBIDDEN)}); name it e.g. diffmoe")


def validate_objective(o: ObjectiveConfig, m: ModelConfig) -> None:
    _choice("objective.type", o.type, OBJECTIVES)
    _choice("objective.time_sampling", o.time_sampling, TIME_SAMPLINGS)
    if o.type == "flow":
        _require(o.time_scale > 0, f"objective.time_scale={o.time_scale} must be positive")
        _require(o.logit_std > 0, f"objective.logit_std={o.logit_std} must be positive")
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
    _require(o.vb_weight >= 0, f"objective.vb_weight={o.vb_weight} must be >= 0")


def validate_sample(s: SampleConfig) -> None:
    """The ``sample`` section on its own: each setting in its range. Run (through
    :func:`validate_sampling`) on every settings object before anything is sampled, and on the
    variants a sweep or an analysis derives from it."""
    _choice("sample.sampler", s.sampler, SAMPLERS)
    _choice("sample.mode", s.mode, INFERENCE_MODES)
    _choice("sample.weights", s.weights, WEIGHTS)
    _choice("sample.precision", s.precision, PRECISIONS)
    _finite(s, "sample.")
    _in_range(s, "sample.")
    _require(s.cfg_scale >= 0, f"sample.cfg_scale={s.cfg_scale} must be >= 0 (1 = no guidance)")
    _require(0.0 <= s.threshold <= 1.0, f"sample.threshold={s.threshold} must be in [0, 1] "
             f"(it is compared with sigmoid probabilities)")
    _require(s.ddim_eta >= 0, f"sample.ddim_eta={s.ddim_eta} must be >= 0 (0 = deterministic)")
    _require(s.ode_rtol > 0 and s.ode_atol > 0,
             f"sample.ode_rtol={s.ode_rtol} and sample.ode_atol={s.ode_atol} must be positive")
    _require(s.sde_noise >= 0, f"sample.sde_noise={s.sde_noise} must be >= 0 (0 = Euler)")


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
    """The text condition's settings, and that condition and dataset agree."""
    m, text = cfg.model, cfg.model.text
    captioned = cfg.data.name in TEXT_DATASETS
    either = cfg.data.name in EITHER_DATASETS  # checked when the data is opened
    if m.condition == "text" and not (captioned or either):
        raise ConfigError(f"model.condition=text needs a captioned dataset, but data.name="
                          f"{cfg.data.name}; use data.name=shapes, emoji, or folder with a "
                          f"metadata.jsonl of captions")
    if m.condition == "class" and captioned:
        raise ConfigError(f"data.name={cfg.data.name} has captions, not class labels; set "
                          f"model.condition=text")
    if m.condition != "text":
        return
    _require(0.0 <= text.dropout < 1.0, f"model.text.dropout={text.dropout} must be in [0, 1)")
