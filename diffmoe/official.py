"""Import checkpoints written by the DiffMoE authors' public code into this library's format.

``diffmoe import-official CHECKPOINT --config THEIR_YAML OUT [key=value ...]`` reads a state dict
in their layout (a bare one, or a training checkpoint with ``model`` / ``ema`` / ``opt``
entries; ``.pt``/``.pth`` or ``.safetensors``), builds our config from their YAML, converts the
weights, and writes a checkpoint (step 0) under ``OUT/checkpoints`` that ``diffmoe sample`` and
``diffmoe eval`` read. The mapping (see docs/imagenet.md):

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
``final_layer.{linear,adaLN_modulation.1}.*``  same
``pos_embed``                                  dropped (ours is the same fixed sin-cos table,
                                               computed)
=============================================  ===============================================

Their YAML sets the architecture: ``model.params.{depth, hidden_size, num_heads, patch_size,
input_size, num_classes}`` and ``MoE_config.{num_experts, capacity, n_shared_experts,
interleave}``; the input channels, ``learn_sigma`` and the FFN width are read from the weights'
shapes. ``key=value`` overrides (e.g. ``objective.time_scale=1``) set anything else.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import Tensor

from .checkpoint import save_checkpoint
from .config import Config, config_from_dict, deep_merge, overrides_to_dict
from .errors import CheckpointError, ConfigError
from .models import DiT, build_model

log = logging.getLogger(__name__)

YAML_MODEL_KEYS = ("depth", "hidden_size", "num_heads", "patch_size", "input_size",
                   "num_classes")
YAML_MOE_KEYS = {"num_experts": "num_experts", "capacity": "capacity",
                 "n_shared_experts": "shared_experts", "interleave": "interleave"}
IGNORED = re.compile(r"^pos_embed$")
# (in a block's MLP?, their name, our name) for every tensor that maps one to one: a name ending
# in "." is a module prefix, any other a whole tensor name.
NAME_PAIRS = [
    (False, "x_embedder.proj.", "x_embedder."),
    (False, "y_embedder.embedding_table.", "y_embedder.table."),
    (True, "gate_weight", "router.weight_ED"),
    (True, "capacity_predictor.0.", "predictor.fc1."),
    (True, "capacity_predictor.2.", "predictor.fc2."),
    (True, "expert_threshold", "thresholds_E"),
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
LIST_SHOWN = 3


# -- config ---------------------------------------------------------------------------------

def config_from_official(yaml_path: str | Path, weights: dict[str, Tensor],
                         overrides: Optional[list[str]] = None) -> Config:
    """Our Config for their YAML, with the shapes the YAML does not give read from weights."""
    path = Path(yaml_path)
    if not path.is_file():
        raise ConfigError(f"their config '{path}' does not exist; pass the YAML the checkpoint "
                          f"was trained with (--config)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"their config '{path}' is not valid YAML; pass the YAML the "
                          f"checkpoint was trained with") from None
    params = (data.get("model") or {}).get("params") if isinstance(data, dict) else None
    if not isinstance(params, dict) or any(k not in params for k in YAML_MODEL_KEYS):
        missing = [k for k in YAML_MODEL_KEYS if not isinstance(params, dict) or k not in params]
        raise ConfigError(f"their config '{path}' has no model.params.{{{', '.join(missing)}}}; "
                          f"pass the YAML of the authors' code the checkpoint was trained with")
    model: dict[str, Any] = {k: params[k] for k in YAML_MODEL_KEYS}
    moe_yaml = data.get("MoE_config") or {}
    moe: dict[str, Any] = {"type": "dense"}
    if moe_yaml.get("num_experts"):
        moe = {"type": "diffmoe", **{ours: moe_yaml[theirs] for theirs, ours in
                                     YAML_MOE_KEYS.items() if theirs in moe_yaml}}
    model["moe"] = moe
    model["class_dropout"] = float(params.get("class_dropout_prob", 0.1))
    # What the YAML leaves out, from the tensors' shapes.
    patch = int(params["patch_size"])
    proj = weights.get("x_embedder.proj.weight")
    final = weights.get("final_layer.linear.weight")
    if proj is not None:
        model["in_channels"] = int(proj.shape[1])
        if final is not None:
            model["learn_sigma"] = int(final.shape[0]) == 2 * patch * patch * int(proj.shape[1])
    hidden = int(params["hidden_size"])
    fc1 = [v for k, v in sorted(weights.items())
           if re.fullmatch(r"blocks\.\d+\.mlp\.(fc1|experts\.0\.fc1)\.weight", k)]
    if fc1:  # a dense FFN's (or one full-width expert's) hidden width
        model["mlp_ratio"] = int(fc1[0].shape[0]) / hidden
    model["moe"].setdefault("interleave", True)
    cfg = {"model": model}
    if overrides:
        cfg = deep_merge(cfg, overrides_to_dict(overrides))
    return config_from_dict(cfg)


# -- weights ---------------------------------------------------------------------------------

def to_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict in their layout (the inverse of :func:`from_official`, pos_embed aside)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(blocks\.\d+\.mlp)\.experts\.(w1_EDF|b1_EF|w2_EFD|b2_ED)", key)
        if m:
            (layer, tensor), transpose = next((lt, tr) for lt, (name, tr) in STACKED.items()
                                              if name == m.group(2))
            for e, v in enumerate(value):
                out[f"{m.group(1)}.experts.{e}.{layer}.{tensor}"] = (
                    v.t().contiguous() if transpose else v.clone())
            continue
        for pattern, repl in OURS_TO_THEIRS:
            if re.search(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value
    return out


def from_official(theirs: dict[str, Tensor], model: DiT, where: str) -> dict[str, Tensor]:
    """Their state dict → ours for ``model``. Keys that do not match the architecture (the
    YAML) raise one CheckpointError naming a few missing and unexpected keys."""
    expected = to_official(model.state_dict())
    given = {k: v for k, v in theirs.items() if not IGNORED.match(k)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [k for k in expected
             if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[:LIST_SHOWN]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:LIST_SHOWN]}")
        if wrong:
            k = wrong[0]
            parts.append(f"{k} is {tuple(given[k].shape)}, the YAML implies "
                         f"{tuple(expected[k].shape)}")
        raise CheckpointError(f"checkpoint {where} does not match their config's architecture "
                              f"({'; '.join(parts)}); pass the YAML it was trained with")
    ours: dict[str, Tensor] = {}
    stacked: dict[str, dict[int, Tensor]] = {}
    for key, value in given.items():
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


def read_official(path: str | Path, trust_pickle: bool = False) -> dict[str, dict[str, Tensor]]:
    """``{"model": ..., "ema": ...}`` (the same dict twice for a bare state dict) from their
    checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass their .pt/.pth or "
                              f".safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint '{path}' is not a readable safetensors file "
                                  f"({exc})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except Exception as exc:  # pickle, zip and weights_only refusals
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = ("; if you trust the file, add --trust-pickle (it holds Python objects "
                    "besides tensors)" if not trust_pickle and "weights_only" in str(exc)
                    else "")
            raise CheckpointError(f"checkpoint '{path}' cannot be read ({first[:160]})"
                                  f"{hint}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a state "
                              f"dict")
    if any(k in obj for k in TRAINING_ENTRIES):
        entries = {k: obj[k] for k in TRAINING_ENTRIES if isinstance(obj.get(k), dict)}
        model = entries.get("model", entries.get("ema"))
        return {"model": model, "ema": entries.get("ema", model)}
    tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not tensors:
        raise CheckpointError(f"checkpoint '{path}' holds no tensors")
    return {"model": tensors, "ema": tensors}


def import_official(checkpoint: str | Path, yaml_path: str | Path, out: str | Path,
                    overrides: Optional[list[str]] = None, trust_pickle: bool = False) -> Path:
    """The ``diffmoe import-official`` command: returns the written checkpoint."""
    out = Path(out)
    if (out / "checkpoints").exists():
        raise CheckpointError(f"'{out}' already holds checkpoints; choose another OUT")
    entries = read_official(checkpoint, trust_pickle)
    cfg = config_from_official(yaml_path, entries["ema"], overrides)
    model = build_model(cfg.model)
    files = {name: from_official(sd, model, f"'{checkpoint}' ({name})")
             for name, sd in entries.items()}
    for tensors in files.values():  # the converted weights load exactly
        model.load_state_dict(tensors)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    state = {"config": cfg.to_dict(), "imported_from": str(Path(checkpoint).resolve()),
             "world_size": 1}
    path = save_checkpoint(out / "checkpoints", 0, files, state)
    log.info("imported %s (%s, %.1fM parameters) to %s", checkpoint, cfg.model.moe.type,
             model.num_params() / 1e6, path)
    return path
