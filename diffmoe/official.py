"""Checkpoints of the DiffMoE authors' public code, read and written as their code does.

``diffmoe import-official CHECKPOINT [--config THEIR_YAML] OUT [key=value ...]`` converts one of
their checkpoints into a run (step 0 under ``OUT/checkpoints``) that ``diffmoe sample`` and
``diffmoe eval`` use without overrides; ``diffmoe export-official RUN OUT`` writes the inverse, an
experiment folder their sampler reads. What their code does, and therefore what is read (their
``train.py``, ``utils.py``, ``download.py``, ``sample_ddp_feature.py``,
``models/models_DiffMoE.py``, ``diffusion/rectified_flow.py``; see docs/imagenet.md):

* An experiment folder holds the YAML it was trained with (``config_<time>.yaml``) and
  ``checkpoints/NNNNNNN.pt`` (the step in seven digits), each a dict with ``model``, ``ema``,
  ``opt`` and ``args`` (an ``argparse.Namespace``, allowed when loading). Their sampler takes
  ``ema`` and the one ``*.yaml`` two folders above the checkpoint; so does the import without
  ``--config``. Both entries are converted (ours: ``ema`` and the raw ``model``); a bare state
  dict serves as both.
* Their YAML: ``model.target`` names the class (``models.models_DiffMoE.DiT``; the dense baseline
  ``models.models_DiT.DiT``) and ``model.params`` its keyword arguments, ``MoE_config`` among
  them; a param left out takes their constructor's default (:data:`THEIR_MODEL_PARAMS`).
* ``basic.rf: true`` trains rectified flow, z_t = t·x + (1−t)·ε, and calls the model with
  t ∈ [0, 1] as drawn: our flow objective with ``time_scale`` 1. Without it, DiT's DDPM
  (:data:`THEIR_DDPM`, integer timesteps, learned σ), whose guidance touches only the first
  three channels (``sample.guidance_channels``).
* Their data is ImageNet encoded by a Stable Diffusion VAE (``basic.vae_path``, default
  ``stabilityai/sd-vae-ft-mse``), latents scaled by 0.18215 and 8 pixels per latent (their
  ``train.py`` and sampler hard-code both): imported as ``data.name: latents`` with that latent
  space recorded (:data:`THEIR_LATENT_SPACE`) and no cache, so sampling needs only the VAE
  (``--vae DIR``, or their ``vae_path`` when it is a local folder).
* Each MoE layer keeps the buffers ``expert_threshold`` (τ) and ``ema_decay`` (α of the threshold
  EMA, ``model.moe.threshold_ema``; read from ``model``, the weights that trained with it). With
  ``n_shared_experts > 0`` a layer has one shared MLP 8·D wide. Their capacity-predictor loss is
  the sum over MoE layers weighted by ``CapacityPred_loss_weight``, ours the mean, so our weight
  is theirs times the number of MoE layers.

The tensors map as follows (τ and α per MoE block):

=============================================  ===============================================
theirs                                         ours
=============================================  ===============================================
``x_embedder.proj.{weight,bias}``              ``x_embedder.{weight,bias}``
``t_embedder.mlp.{0,2}.*``                     same
``y_embedder.embedding_table.weight``          ``y_embedder.table.weight``
``blocks.i.attn.{qkv,proj}.*``                 same
``blocks.i.adaLN_modulation.1.*``              same
``blocks.i.mlp.fc1/fc2.*`` (dense blocks)      same
``blocks.i.mlp.gate_weight`` (E×D)             ``blocks.i.mlp.router.weight_ED``
``blocks.i.mlp.experts.e.fc1.weight`` (F×D)    ``blocks.i.mlp.experts.w1_EDF[e]`` (transposed)
``blocks.i.mlp.experts.e.fc1.bias``            ``blocks.i.mlp.experts.b1_EF[e]``
``blocks.i.mlp.experts.e.fc2.weight`` (D×F)    ``blocks.i.mlp.experts.w2_EFD[e]`` (transposed)
``blocks.i.mlp.experts.e.fc2.bias``            ``blocks.i.mlp.experts.b2_ED[e]``
``blocks.i.mlp.shared_experts.fc1/fc2.*``      ``blocks.i.mlp.shared.fc1/fc2.*``
``blocks.i.mlp.capacity_predictor.{0,2}.*``    ``blocks.i.mlp.predictor.{fc1,fc2}.*``
``blocks.i.mlp.expert_threshold`` (buffer)     ``blocks.i.mlp.thresholds_E``
``blocks.i.mlp.ema_decay`` (buffer, 1 value)   ``model.moe.threshold_ema`` (config)
``final_layer.{linear,adaLN_modulation.1}.*``  same
``pos_embed``                                  checked, then dropped (ours is the same fixed
                                               sin-cos table, computed)
=============================================  ===============================================
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from torch import Tensor

from .checkpoint import open_checkpoint, save_checkpoint, state_dict_mismatch
from .config import Config, ModelConfig, config_from_dict, deep_merge, overrides_to_dict
from .data.latents import LatentSpace, as_vae, check_vae_fits, finished_index
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write, atomic_write_text
from .hub import nonfinite_tensors
from .models import DiT, build_model
from .models.dit import sincos_pos_embed_2d
from .paths import check_outputs, file_in_the_way
from .run import CONFIG_FILE

log = logging.getLogger(__name__)

THEIR_DIFFMOE = "models.models_DiffMoE.DiT"
THEIR_DENSE = "models.models_DiT.DiT"
# Their DiT's keyword arguments that set ours: their name → (our model key, their default).
THEIR_MODEL_PARAMS = {
    "input_size": ("input_size", 32), "patch_size": ("patch_size", 2),
    "in_channels": ("in_channels", 4), "hidden_size": ("hidden_size", 1152),
    "depth": ("depth", 28), "num_heads": ("num_heads", 16), "mlp_ratio": ("mlp_ratio", 4.0),
    "class_dropout_prob": ("class_dropout", 0.1), "num_classes": ("num_classes", 1000),
    "learn_sigma": ("learn_sigma", True)}
# The other keyword arguments each class takes (checked, or without effect on the weights).
THEIR_OTHER_PARAMS = {
    THEIR_DENSE: {"head_dim", "use_swiglu"},
    THEIR_DIFFMOE: {"head_dim", "use_swiglu", "MoE_config", "init_MoeMLP",
                    "use_capacity_schedule", "CapacityPred_loss_weight"}}
THEIR_PREDICTOR_WEIGHT = 0.01  # CapacityPred_loss_weight when their YAML leaves it out
# MoE_config keys their DiffMoE DiT reads (their code fails without any of them).
MOE_CONFIG_REQUIRED = ("num_experts", "capacity", "n_shared_experts", "interleave")
MOE_CONFIG_KEYS = {"num_experts": "num_experts", "capacity": "capacity",
                   "interleave": "interleave"}  # their MoE_config key → ours, one to one
# Their shared expert: one MLP int(D * 4.0 * 2) wide whatever n_shared_experts > 0 says.
THEIR_SHARED_WIDTH = 8
FLOW_TIME_SCALE = 1.0  # their rectified flow calls the model with t in [0, 1] unscaled
# DiT's create_diffusion defaults, which their DDPM training and sampling use.
THEIR_DDPM = {"type": "ddpm", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
              "vb_weight": 1.0}
DDPM_GUIDED_CHANNELS = 3  # their DDPM sampler's forward_with_cfg guides channels :3
# Their latents: vae.encode(x) * 0.18215 in train.py, vae.decode(z / 0.18215) and
# latent_size = image_size // 8 in sample_ddp_feature.py (SD's VAE), no shift.
THEIR_LATENT_SPACE = {"scale_factor": 0.18215, "shift_factor": 0.0, "downsampling": 8}
THEIR_VAE = "stabilityai/sd-vae-ft-mse"  # their YAML's basic.vae_path and their sampler's --vae
CHECKPOINTS_DIR = "checkpoints"
YAML_PATTERN = "*.yaml"  # how their sampler finds the YAML beside checkpoints/
EXPORT_YAML = "config.yaml"
STEP_DIGITS = 7  # their checkpoint names: f"{train_steps:07d}.pt"
# Their EMA copy averages pos_embed too, so its table drifts from the exact one by rounding.
POS_EMBED_ATOL = 1e-2
# Significant digits kept of a loss weight scaled by the MoE layer count (drops float noise).
WEIGHT_DIGITS = 15
LOADABLE_GLOBALS = [argparse.Namespace]  # their train.py saves its args in the checkpoint
ALPHA_BUFFER = "ema_decay"  # their per-layer α, beside τ (our THRESHOLDS)
THRESHOLDS = "thresholds_E"
DROPPED = re.compile(r"^(pos_embed|blocks\.\d+\.mlp\." + ALPHA_BUFFER + ")$")
ALPHA_RE = re.compile(r"^blocks\.\d+\.mlp\." + ALPHA_BUFFER + "$")
OPTIONAL = {"pos_embed"}  # may be left out of a state dict someone else converted
# (in a block's MLP?, their name, our name) for every tensor that maps one to one: a name ending
# in "." is a module prefix, any other a whole tensor name.
NAME_PAIRS = [
    (False, "x_embedder.proj.", "x_embedder."),
    (False, "y_embedder.embedding_table.", "y_embedder.table."),
    (True, "gate_weight", "router.weight_ED"),
    (True, "capacity_predictor.0.", "predictor.fc1."),
    (True, "capacity_predictor.2.", "predictor.fc2."),
    (True, "expert_threshold", THRESHOLDS),
    (True, "shared_experts.", "shared."),
]


def _rename_rules(to_ours: bool) -> list[tuple[str, str]]:
    """(pattern, replacement) for :data:`NAME_PAIRS`, their names to ours or back."""
    rules = []
    for in_mlp, theirs, ours in NAME_PAIRS:
        src, dst = (theirs, ours) if to_ours else (ours, theirs)
        pattern = re.escape(src) + ("" if src.endswith(".") else "$")
        rules.append((r"^(blocks\.\d+\.mlp)\." + pattern, r"\1." + dst) if in_mlp
                     else ("^" + pattern, dst))
    return rules


RENAMES = _rename_rules(to_ours=True)
OURS_TO_THEIRS = _rename_rules(to_ours=False)
EXPERT_RE = re.compile(r"^(blocks\.\d+\.mlp)\.experts\.(\d+)\.(fc1|fc2)\.(weight|bias)$")
# Our stacked expert tensors: (their layer, their tensor) → (our name, transpose?)
STACKED = {("fc1", "weight"): ("w1_EDF", True), ("fc1", "bias"): ("b1_EF", False),
           ("fc2", "weight"): ("w2_EFD", True), ("fc2", "bias"): ("b2_ED", False)}
TRAINING_ENTRIES = ("model", "ema")


def their_moe_blocks(depth: int, interleave: bool) -> int:
    """How many MoE layers their DiT has: blocks 1, 3, 5, ... with interleave, else all."""
    return depth // 2 if interleave else depth


def their_pos_embed(m: ModelConfig) -> Tensor:
    """Their ``pos_embed`` parameter, (1, tokens, D): the fixed 2-D sin-cos table."""
    return torch.from_numpy(sincos_pos_embed_2d(m.hidden_size, m.input_size // m.patch_size))[None]


def _float32_decimal(value: float) -> float:
    """The shortest decimal that a float32 buffer's value rounds from (0.95, not 0.9499999881)."""
    return float(str(np.float32(value)))


def _weight(value: float) -> float:
    """A loss weight after scaling, without the last bits of float noise (0.1, not 0.1000...02)."""
    return float(f"{value:.{WEIGHT_DIGITS}g}")


# -- their YAML → our config ------------------------------------------------------------------

def find_their_config(checkpoint: Path) -> Path:
    """The one ``*.yaml`` of the experiment folder ``EXP`` of ``EXP/checkpoints/NNNNNNN.pt``,
    where their training saves it and their sampler looks."""
    exp = checkpoint.absolute().parents[1]
    found = sorted(exp.glob(YAML_PATTERN))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(f"no YAML in '{exp}', where their experiment layout keeps it "
                          f"(EXP/config_<time>.yaml beside EXP/checkpoints/NNNNNNN.pt); pass the "
                          f"YAML the checkpoint was trained with as --config")
    raise ConfigError(f"'{exp}' holds {len(found)} YAML files "
                      f"({', '.join(p.name for p in found)}); pass the one the checkpoint was "
                      f"trained with as --config")


def load_their_yaml(path: Path) -> dict:
    """Their YAML as a dict, with ``model.target`` and ``model.params`` present."""
    if not path.is_file():
        raise ConfigError(f"their config '{path}' does not exist; pass the YAML the checkpoint "
                          f"was trained with (--config)")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"their config '{path}' is not valid YAML; pass the YAML the "
                          f"checkpoint was trained with") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        raise ConfigError(f"their config '{path}' has no model.params; pass the YAML of the "
                          f"authors' code the checkpoint was trained with")
    target = model.get("target")
    if not isinstance(target, str) or target not in THEIR_OTHER_PARAMS:
        raise ConfigError(f"their config '{path}' has model.target {target!r}; import-official "
                          f"reads {THEIR_DIFFMOE} and {THEIR_DENSE} (other classes have other "
                          f"layouts)")
    unknown = sorted(set(model["params"]) - set(THEIR_MODEL_PARAMS) - THEIR_OTHER_PARAMS[target])
    if unknown:
        raise ConfigError(f"their config '{path}' gives model.params.{{{', '.join(unknown)}}}, "
                          f"which their {target} does not take; fix the YAML")
    return data


def _number(value: Any, name: str, where: Path) -> float:
    """``value`` from their YAML, refused unless it is a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"their config '{where}' has {name}={value!r}; it must be a number")
    return value


def _check_importable(params: dict, m: ModelConfig, where: Path) -> None:
    """What their YAML can say that our model cannot hold."""
    problems = []
    if params.get("use_swiglu"):
        problems.append("use_swiglu: true (SwiGLU experts; ours are GELU MLPs)")
    head_dim = params.get("head_dim")
    if head_dim is not None and (_number(head_dim, "model.params.head_dim", where) * m.num_heads
                                 != m.hidden_size):
        problems.append(f"head_dim: {head_dim} (ours is hidden_size / num_heads = "
                        f"{m.hidden_size // m.num_heads})")
    if m.class_dropout == 0:
        problems.append("class_dropout_prob: 0 (their label table then has no null-class row, "
                        "which ours always has)")
    if problems:
        raise ConfigError(f"their config '{where}' sets model.params {'; '.join(problems)}; "
                          f"import-official cannot convert such a model")


def _moe_config(params: dict, where: Path) -> dict:
    """Our ``model.moe`` keys that their ``MoE_config`` (under ``model.params``, where their DiT
    reads it) gives one to one."""
    moe_yaml = params.get("MoE_config")
    missing = [k for k in MOE_CONFIG_REQUIRED
               if not isinstance(moe_yaml, dict) or k not in moe_yaml]
    if missing:
        raise ConfigError(f"their config '{where}' has no model.params.MoE_config."
                          f"{{{', '.join(missing)}}}, which {THEIR_DIFFMOE} reads; pass the YAML "
                          f"the checkpoint was trained with")
    if moe_yaml.get("capacity_schedule"):
        log.warning("their MoE_config.capacity_schedule (a training-time capacity ramp) has no "
                    "counterpart here; sampling does not use it")
    return {"type": "diffmoe", **{ours: moe_yaml[theirs]
                                  for theirs, ours in MOE_CONFIG_KEYS.items()}}


def _moe_derived(params: dict, m: ModelConfig, alpha: Optional[float], where: Path) -> dict:
    """Our ``model.moe`` keys that take arithmetic on theirs (``m``: the model their YAML gives,
    type-checked): the shared experts, the predictor loss weight, and the threshold EMA α."""
    moe: dict[str, Any] = {}
    moe_yaml = params["MoE_config"]
    expert = int(m.mlp_ratio * m.hidden_size)
    shared = THEIR_SHARED_WIDTH * m.hidden_size
    if _number(moe_yaml["n_shared_experts"], "MoE_config.n_shared_experts", where) > 0:
        if shared % expert:
            raise ConfigError(f"their config '{where}' has a shared expert {shared} wide, not a "
                              f"whole number of experts {expert} wide (mlp_ratio "
                              f"{m.mlp_ratio}); import-official cannot convert it")
        moe["shared_experts"] = shared // expert
    weight = _number(params.get("CapacityPred_loss_weight", THEIR_PREDICTOR_WEIGHT),
                     "model.params.CapacityPred_loss_weight", where)
    moe["predictor_loss_weight"] = _weight(weight * their_moe_blocks(m.depth, m.moe.interleave))
    if alpha is not None:
        moe["threshold_ema"] = alpha
    return moe


def _objective_sections(data: dict, in_channels: int, where: Path) -> dict:
    """``objective`` (and ``sample``) for their ``basic.rf``, as their train.py and sampler read
    it: true is rectified flow on t in [0, 1], false or absent DiT's DDPM."""
    basic = data.get("basic")
    if not isinstance(basic, dict):
        raise ConfigError(f"their config '{where}' has no basic section, whose rf says whether "
                          f"the model was trained with rectified flow or DDPM; pass the YAML "
                          f"saved in their experiment folder")
    rf = basic.get("rf") or False
    if not isinstance(rf, bool):
        raise ConfigError(f"their config '{where}' has basic.rf={rf!r}; it must be true or false")
    if rf:
        return {"objective": {"type": "flow", "time_scale": FLOW_TIME_SCALE}}
    return {"objective": dict(THEIR_DDPM),
            "sample": {"guidance_channels": min(DDPM_GUIDED_CHANNELS, in_channels)}}


def threshold_ema(weights: dict[str, Tensor], where: str) -> Optional[float]:
    """α from the MoE layers' ``ema_decay`` buffers (None without MoE layers); they must agree,
    as our config holds one."""
    values = sorted({_float32_decimal(float(v.reshape(-1)[0])) for k, v in weights.items()
                     if ALPHA_RE.match(k) and v.numel()})
    if len(values) > 1:
        raise CheckpointError(f"checkpoint {where} has MoE layers with different ema_decay "
                              f"values {values}; our model.moe.threshold_ema is one value for "
                              f"all layers, so it cannot be imported as it is")
    return values[0] if values else None


def _data_section(data: dict, vae: Optional[str | Path]) -> dict:
    """``data`` for their latents: their latent space, no cache, and the VAE: ``vae``, else
    their ``basic.vae_path`` when it is a local folder (a Hub name is not fetched)."""
    basic = data.get("basic")
    named = (basic.get("vae_path") if isinstance(basic, dict) else None) or THEIR_VAE
    if vae is None and (Path(str(named)) / "config.json").is_file():
        vae = named
    if vae is None:
        log.info("their run decodes with the VAE '%s'; to sample images pass a local copy of "
                 "it: --vae DIR here, or diffmoe sample --vae DIR", named)
    return {"name": "latents", "path": "", "vae": str(Path(vae).resolve()) if vae else "",
            **THEIR_LATENT_SPACE}


def config_from_official(data: dict, where: Path, alpha: Optional[float] = None,
                         overrides: Optional[list[str]] = None,
                         vae: Optional[str | Path] = None) -> Config:
    """Our Config for their YAML ``data`` (read by :func:`load_their_yaml` from ``where``), with
    the threshold EMA ``alpha`` of their weights and their latent data decoded by ``vae`` (see
    :func:`_data_section`); ``key=value`` overrides apply last."""
    params, target = data["model"]["params"], data["model"]["target"]
    model: dict[str, Any] = {ours: params.get(theirs, default)
                             for theirs, (ours, default) in THEIR_MODEL_PARAMS.items()}
    if target == THEIR_DIFFMOE:
        model["moe"] = _moe_config(params, where)
    typed = config_from_dict({"model": model}).model  # their values, type-checked
    _check_importable(params, typed, where)
    if target == THEIR_DIFFMOE:
        model["moe"].update(_moe_derived(params, typed, alpha, where))
    cfg = {"model": model, "data": _data_section(data, vae),
           **_objective_sections(data, typed.in_channels, where)}
    if overrides:
        cfg = deep_merge(cfg, overrides_to_dict(overrides))
    return config_from_dict(cfg)


# -- weights -----------------------------------------------------------------------------------

def to_official(state: dict[str, Tensor], alpha: float, pos_embed: Tensor) -> dict[str, Tensor]:
    """Our state dict in their layout: their names, per-expert tensors, an ``ema_decay`` buffer
    holding ``alpha`` beside each threshold buffer, and their ``pos_embed``."""
    out: dict[str, Tensor] = {"pos_embed": pos_embed.float().clone()}
    for key, value in state.items():
        m = re.fullmatch(r"(blocks\.\d+\.mlp)\.experts\.(w1_EDF|b1_EF|w2_EFD|b2_ED)", key)
        if m:
            (layer, tensor), transpose = next((lt, tr) for lt, (name, tr) in STACKED.items()
                                              if name == m.group(2))
            for e, v in enumerate(value):
                out[f"{m.group(1)}.experts.{e}.{layer}.{tensor}"] = (
                    v.t().contiguous() if transpose else v.clone())
            continue
        if key.endswith("." + THRESHOLDS):
            out[key.replace(THRESHOLDS, ALPHA_BUFFER)] = torch.tensor([alpha])
        for pattern, repl in OURS_TO_THEIRS:
            if re.search(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value
    return out


def _check_keys(given: dict[str, Tensor], expected: dict[str, Tensor], where: str) -> None:
    """One CheckpointError naming a few missing and unexpected keys, or a wrong shape or table."""
    parts = state_dict_mismatch(given, expected, "in the model their YAML describes",
                                frozenset(OPTIONAL))
    table = given.get("pos_embed")
    if not parts and table is not None and not torch.allclose(
            table.float(), expected["pos_embed"], atol=POS_EMBED_ATOL):
        parts.append("its pos_embed is not the fixed 2-D sin-cos table of that size")
    if parts:
        raise CheckpointError(f"checkpoint {where} does not match their config's architecture "
                              f"({'; '.join(parts)}); pass the YAML it was trained with")


def from_official(theirs: dict[str, Tensor], model: DiT, where: str) -> dict[str, Tensor]:
    """Their state dict → ours for ``model``, after checking its keys and shapes against the
    architecture (the YAML)."""
    expected = to_official(model.state_dict(), model.cfg.moe.threshold_ema,
                           their_pos_embed(model.cfg))
    _check_keys(theirs, expected, where)
    ours: dict[str, Tensor] = {}
    stacked: dict[str, dict[int, Tensor]] = {}
    for key, value in theirs.items():
        if DROPPED.match(key):
            continue
        m = EXPERT_RE.match(key)
        if m:
            name, transpose = STACKED[(m.group(3), m.group(4))]
            stacked.setdefault(f"{m.group(1)}.experts.{name}", {})[int(m.group(2))] = (
                value.t() if transpose else value)
            continue
        for pattern, repl in RENAMES:
            if re.search(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        ours[key] = value
    for key, per_expert in stacked.items():
        ours[key] = torch.stack([per_expert[e] for e in sorted(per_expert)]).contiguous()
    own = model.state_dict()
    return {k: v.to(own[k].dtype).contiguous() for k, v in ours.items()}


def _their_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a directory; pass their .pt/.pth or "
                              f".safetensors file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass their .pt/.pth or "
                              f".safetensors file")
    return path


# How a file torch.save wrote begins: a zip archive (since torch 1.6) or a pickle (protocol 2+).
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def _load(path: Path, trust_pickle: bool) -> Any:
    """The object in their checkpoint file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint '{path}' is not a readable safetensors file "
                                  f"({exc})") from None
    with open(path, "rb") as fh:
        start = fh.read(max(len(s) for s in TORCH_FILE_STARTS))
    if not start.startswith(TORCH_FILE_STARTS):
        raise CheckpointError(f"checkpoint '{path}' is not a file torch.save wrote (neither a zip "
                              f"archive nor a pickle); pass their .pt/.pth or .safetensors file")
    try:
        with torch.serialization.safe_globals(LOADABLE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # pickle, zip and weights_only refusals
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("; if you trust the file, add --trust-pickle (it holds Python objects "
                "besides tensors)" if not trust_pickle and "weights_only" in str(exc) else "")
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({first[:160]}){hint}") from None


def read_official(path: str | Path, trust_pickle: bool = False) -> dict[str, dict[str, Tensor]]:
    """``{"model": ..., "ema": ...}`` from their checkpoint file: the entries of a training
    checkpoint (one standing in for a missing other), or a bare state dict twice."""
    path = _their_checkpoint(path)
    obj = _load(path, trust_pickle)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a state "
                              f"dict")
    if any(k in obj for k in TRAINING_ENTRIES):
        entries = {k: obj[k] for k in TRAINING_ENTRIES if isinstance(obj.get(k), dict)}
        if not entries:
            raise CheckpointError(f"checkpoint '{path}' has 'model'/'ema' entries that are not "
                                  f"state dicts")
        model = entries.get("model", entries.get("ema"))
        return {"model": model, "ema": entries.get("ema", model)}
    tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not tensors:
        raise CheckpointError(f"checkpoint '{path}' holds no tensors")
    return {"model": tensors, "ema": tensors}


def _new_output(out: Path) -> None:
    """Refuse an OUT that cannot be created or already holds something."""
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise ConfigError(f"'{blocker}' is a file, so '{out}' cannot be created; choose another "
                          f"OUT")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"'{out}' already exists and is not empty; choose a new OUT")
    check_outputs([out / CONFIG_FILE], force=False, option="OUT")


def _check_vae(cfg: Config) -> None:
    """The VAE an import names loads and fits the model (latent channels, downsampling)."""
    d = cfg.data
    if d.name == "latents" and d.vae:
        space = LatentSpace.of_config(dataclasses.asdict(d))
        if space is not None:
            check_vae_fits(as_vae(d.vae), space, cfg.model.in_channels, f"'{d.vae}'")


def import_official(checkpoint: str | Path, yaml_path: Optional[str | Path], out: str | Path,
                    overrides: Optional[list[str]] = None, trust_pickle: bool = False,
                    vae: Optional[str | Path] = None) -> Path:
    """The ``diffmoe import-official`` command (``yaml_path`` None: the YAML of their experiment
    folder; ``vae``: the local AutoencoderKL folder that decodes its samples); returns the written
    checkpoint. Everything is checked before anything is written."""
    out = Path(out)
    _new_output(out)
    checkpoint = _their_checkpoint(checkpoint)
    yaml_path = Path(yaml_path) if yaml_path is not None else find_their_config(checkpoint)
    data = load_their_yaml(yaml_path)
    entries = read_official(checkpoint, trust_pickle)
    alpha = threshold_ema(entries["model"], f"'{checkpoint}' (model)")
    cfg = config_from_official(data, yaml_path, alpha, overrides, vae)
    _check_vae(cfg)
    model = build_model(cfg.model)
    files = {name: from_official(sd, model, f"'{checkpoint}' ({name})")
             for name, sd in entries.items()}
    for name, tensors in files.items():  # the converted weights are finite and load exactly
        bad = nonfinite_tensors(tensors)
        if bad:
            raise CheckpointError(f"checkpoint '{checkpoint}' ({name}) holds NaN or inf in "
                                  f"{len(bad)} of its tensors (first: {bad[0]}); nothing was "
                                  f"imported; convert a checkpoint of a run that did not "
                                  f"diverge")
        model.load_state_dict(tensors)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, cfg.to_yaml())
    state = {"config": cfg.to_dict(), "imported_from": str(checkpoint.resolve()),
             "imported_config": str(yaml_path.resolve()), "world_size": 1}
    path = save_checkpoint(out / CHECKPOINTS_DIR, 0, files, state)
    log.info("imported %s (%s, %s, %.1fM parameters) to %s", checkpoint, cfg.model.moe.type,
             cfg.objective.type, model.num_params() / 1e6, path)
    return path


# -- our run → their experiment folder ----------------------------------------------------------

def export_problems(cfg: Config) -> list[str]:
    """Why their code cannot express ``cfg``'s model and objective (empty: it can)."""
    m, moe, o = cfg.model, cfg.model.moe, cfg.objective
    problems = []
    if m.condition != "class":
        problems.append(f"model.condition={m.condition} (their DiT takes class labels)")
    if m.final_conv:
        problems.append("model.final_conv=true (their DiT has no output convolution)")
    if m.class_dropout == 0:
        problems.append("model.class_dropout=0 (their label table then has no null-class row)")
    if moe.type in ("token_choice", "expert_choice"):
        problems.append(f"model.moe.type={moe.type} (their {THEIR_DIFFMOE} routes by DiffMoE's "
                        f"rule; only diffmoe and dense runs can be exported)")
    if moe.type == "diffmoe" and moe.pool_scope != "batch":
        problems.append(f"model.moe.pool_scope={moe.pool_scope} (their experts choose from the "
                        f"batch-level pool)")
    if moe.type != "dense" and moe.granularity != 1:
        problems.append(f"model.moe.granularity={moe.granularity} (fine-grained experts; theirs "
                        f"are all mlp_ratio·D wide)")
    elif moe.type == "diffmoe" and moe.shared_experts and (
            moe.shared_experts * int(m.mlp_ratio * m.hidden_size)
            != THEIR_SHARED_WIDTH * m.hidden_size):
        problems.append(f"model.moe.shared_experts={moe.shared_experts} (their shared expert is "
                        f"one MLP {THEIR_SHARED_WIDTH}·D wide)")
    problems += _latent_problems(cfg)
    if o.type == "flow" and o.time_scale != FLOW_TIME_SCALE:
        problems.append(f"objective.time_scale={o.time_scale:g} (their rectified flow gives the "
                        f"model t in [0, 1], time_scale 1)")
    if o.type == "ddpm":
        differ = [f"objective.{k}={getattr(o, k)}" for k, v in THEIR_DDPM.items()
                  if getattr(o, k) != v] + ([] if m.learn_sigma else ["model.learn_sigma=false"])
        if differ:
            problems.append(f"{', '.join(differ)} (their DDPM is DiT's: 1000 timesteps, betas "
                            f"1e-4..0.02, learned sigma)")
    return problems


def _latent_problems(cfg: Config) -> list[str]:
    """Why ``cfg``'s data is not their latents (empty: it is)."""
    d = cfg.data
    if d.name != "latents":
        return [f"data.name={d.name} (their code trains and samples SD-VAE latents; a "
                f"pixel-space model is not theirs)"]
    data = dataclasses.asdict(d)
    index = finished_index(d.path)
    space = LatentSpace.of_config(data) or (LatentSpace.of_index(index) if index else None)
    if space is None:
        return [f"data.scale_factor is not recorded and the latent cache '{d.path}' is gone, so "
                f"the latent scale their sampler would assume (0.18215) cannot be checked"]
    theirs = LatentSpace(*THEIR_LATENT_SPACE.values())
    if (space.scale, space.shift) != (theirs.scale, theirs.shift) or (
            space.downsampling not in (0, theirs.downsampling)):
        return [f"latents scaled by {space.scale:g}, shift {space.shift:g}, downsampling "
                f"{space.downsampling} (their code hard-codes {theirs.scale:g}, no shift, 8)"]
    return []


def official_yaml(cfg: Config, exp_name: str) -> dict:
    """Their YAML for ``cfg``: ``basic`` (the objective) and ``model`` (class and params), the
    parts their sampler reads."""
    m, moe = cfg.model, cfg.model.moe
    params: dict[str, Any] = {theirs: getattr(m, ours)
                              for theirs, (ours, _) in THEIR_MODEL_PARAMS.items()}
    params["use_swiglu"] = False
    target = THEIR_DENSE
    if moe.type == "diffmoe":
        target = THEIR_DIFFMOE
        params["MoE_config"] = {"n_shared_experts": moe.shared_experts, "init_MoeMLP": False,
                                **{theirs: getattr(moe, ours)
                                   for theirs, ours in MOE_CONFIG_KEYS.items()}}
        blocks = their_moe_blocks(m.depth, moe.interleave)
        params["CapacityPred_loss_weight"] = _weight(moe.predictor_loss_weight / blocks)
    basic = {"exp_name": exp_name, "rf": cfg.objective.type == "flow", "rf_ori": False,
             "image_size": m.input_size * THEIR_LATENT_SPACE["downsampling"],
             "vae_path": cfg.data.vae or THEIR_VAE}
    return {"basic": basic, "model": {"ckpt": None, "target": target, "params": params}}


def export_official(run: str | Path, out: str | Path) -> Path:
    """The ``diffmoe export-official`` command: ``OUT/config.yaml`` and
    ``OUT/checkpoints/NNNNNNN.pt`` (``{"model", "ema"}`` in their layout) for a run's newest
    checkpoint (or the checkpoint given); returns the written checkpoint."""
    out = Path(out)
    _new_output(out)
    ckpt = open_checkpoint(run)
    try:
        cfg = config_from_dict(ckpt.state["config"])
    except (KeyError, TypeError):
        raise CheckpointError(f"checkpoint '{ckpt.path}' has no usable config in state.json; it "
                              f"is damaged") from None
    problems = export_problems(cfg)
    if problems:
        raise ConfigError(f"'{ckpt.path}' cannot be written for the authors' code: "
                          f"{'; '.join(problems)}; their code cannot run such a model, so "
                          f"export-official writes nothing for it")
    pos_embed = their_pos_embed(cfg.model)
    entries = {name: to_official(ckpt.tensors(name), cfg.model.moe.threshold_ema, pos_embed)
               for name in TRAINING_ENTRIES}
    path = out / CHECKPOINTS_DIR / f"{ckpt.state['step']:0{STEP_DIGITS}d}.pt"
    atomic_write(path, lambda tmp: torch.save(entries, tmp))
    atomic_write_text(out / EXPORT_YAML,
                      yaml.safe_dump(official_yaml(cfg, out.name), sort_keys=False))
    log.info("exported %s to %s", ckpt.path, path)
    return path
