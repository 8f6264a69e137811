"""Dataclass configs, YAML loading, dotted command-line overrides and validation.

A run is described by one :class:`Config` with five sections: ``model`` (with ``model.moe``),
``objective``, ``data``, ``train`` and ``sample``. It is built in this order, later steps winning:

1. the dataclass defaults (:mod:`.schema`);
2. the named preset in ``model.preset`` (e.g. ``DiffMoE-S-E16``), if any;
3. the YAML file;
4. ``key=value`` overrides from the command line, with dotted keys (``model.moe.num_experts=8``).

Each key is declared once, as a field of its section (:mod:`.keys`): type, default, the values
it may take, resume class and meaning. Unknown keys and wrongly typed values are rejected with a
message naming the key and the fix (:mod:`.loading`); :func:`validate` then checks each value
against its declaration and the values against each other (:mod:`.validation`).
"""

from .loading import (
    config_from_dict,
    config_with,
    deep_merge,
    load_config,
    load_yaml,
    overrides_to_dict,
    parse_override,
)
from .schema import (
    CONDITIONS,
    DATASETS,
    DEVICES,
    DISPATCH_KERNELS,
    EMA_BUFFER_RULES,
    FAMILIES,
    FFN_TYPES,
    INFERENCE_MODES,
    LR_SCHEDULES,
    NONFINITE_POLICIES,
    OBJECTIVES,
    PARALLEL,
    POOL_SCOPES,
    PRECISIONS,
    ROUTING_MODES,
    SAMPLERS,
    SAMPLERS_BY_OBJECTIVE,
    SIZES,
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
    TextConfig,
    TrainConfig,
    preset,
    preset_names,
)
from .validation import (
    MIN_ALPHA_BAR,
    check_keys,
    resolve_sampler,
    validate,
    validate_data,
    validate_folder,
    validate_inference_mode,
    validate_model,
    validate_moe,
    validate_objective,
    validate_sample,
    validate_sampling,
    validate_text,
    validate_train,
)

__all__ = [
    "CONDITIONS", "DATASETS", "DEVICES", "DISPATCH_KERNELS", "EMA_BUFFER_RULES", "FAMILIES",
    "FFN_TYPES", "INFERENCE_MODES", "LR_SCHEDULES", "MIN_ALPHA_BAR", "NONFINITE_POLICIES",
    "OBJECTIVES", "PARALLEL", "POOL_SCOPES", "PRECISIONS", "ROUTING_MODES", "SAMPLERS",
    "SAMPLERS_BY_OBJECTIVE", "SIZES", "TEXT_DATASETS", "TIME_SAMPLINGS", "TOKEN_POOLS",
    "TRACKERS", "WEIGHTS", "Config", "DataConfig", "MoEConfig", "ModelConfig",
    "ObjectiveConfig", "SampleConfig", "TextConfig", "TrainConfig", "check_keys",
    "config_from_dict", "config_with", "deep_merge", "load_config", "load_yaml",
    "overrides_to_dict", "parse_override", "preset", "preset_names", "resolve_sampler",
    "validate", "validate_data", "validate_folder", "validate_inference_mode",
    "validate_model", "validate_moe", "validate_objective", "validate_sample",
    "validate_sampling", "validate_text", "validate_train",
]
