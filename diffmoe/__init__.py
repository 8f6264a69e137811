"""DiffMoE: diffusion transformers whose feed-forward layers are mixtures of experts that choose
tokens from a batch-level global pool (arXiv 2503.14487).

Comments cite the paper by equation number (Eq. N, the paper's own) and by section (paper §N, the
sections of the summary listed at the top of docs/paper-to-code.md).

What a Python user needs is importable from here (docs/python-api.md): the pipeline, the
Hub-style folder, the drop-in MoE layers, the config and the model. The names are imported when
first used, so ``import diffmoe`` (and every ``diffmoe`` command) stays as fast as before.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:  # for type checkers and editors; at run time see __getattr__
    from . import train  # noqa: F401
    from .config import Config, load_config  # noqa: F401
    from .errors import CapacityWarning, DiffMoEError  # noqa: F401
    from .hub import Pretrained, load_model, load_pretrained  # noqa: F401
    from .layers import (  # noqa: F401
        DiffMoELayer,
        DiffMoEMlp,
        ExpertChoiceLayer,
        MoEOutput,
        TokenChoiceLayer,
        moe_losses,
        routing,
        update_thresholds,
    )
    from .models import DiT, build_model  # noqa: F401
    from .models.moe import Routing, apply_threshold_updates, diffmoe_layers  # noqa: F401
    from .pipeline import CapacityReport, DiffMoEPipeline, PipelineOutput  # noqa: F401

__version__ = "0.1.0"

# Each public name → the module that defines it; "train" is the module diffmoe.train itself,
# which is callable: diffmoe.train(config_or_path, **overrides) (diffmoe.train.train_from).
_EXPORTS = {
    "Config": "config", "load_config": "config", "DiffMoEError": "errors",
    "CapacityWarning": "errors", "Pretrained": "hub", "load_model": "hub",
    "load_pretrained": "hub", "DiffMoELayer": "layers", "DiffMoEMlp": "layers",
    "ExpertChoiceLayer": "layers", "MoEOutput": "layers", "TokenChoiceLayer": "layers",
    "moe_losses": "layers", "routing": "layers", "update_thresholds": "layers",
    "DiT": "models", "build_model": "models", "Routing": "models.moe",
    "apply_threshold_updates": "models.moe", "diffmoe_layers": "models.moe",
    "CapacityReport": "pipeline", "DiffMoEPipeline": "pipeline", "PipelineOutput": "pipeline",
    "train": "train",
}
__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> _Any:
    """Import a public name's module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffmoe' has no attribute '{name}'")
    module = _importlib.import_module(f".{_EXPORTS[name]}", __name__)
    value = module if name == _EXPORTS[name] else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return list(__all__)
