"""What each config key means for a resumed run: every key of the schema has one class here.

* ``architecture``, ``objective``, ``data``: what the weights are, what they are trained to
  predict, and on what data in which order. A resume that changes one of them would continue
  another run on these weights, so it is refused.
* ``optimisation``: how the weights are updated (learning rate and its schedule, AdamW, batch,
  EMA, regularisation, loss weights, numeric precision). A resume may change them only when it
  says so (``--accept-changes``); the change is recorded in the run directory.
* ``bookkeeping``: how long the run goes, how often it logs, samples and saves, where and on
  what it runs, how it reacts to a non-finite loss, and the sample grids' settings. Free to
  change on resume, and recorded too.

A key's class can depend on the config (:func:`key_class`): ``train.steps`` is where a cosine
learning-rate schedule reaches 0, so under ``train.lr_schedule=cosine`` it is an optimisation
setting. Every change a resume accepts is logged as a warning; none is silent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .schema import Config

ARCHITECTURE = "architecture"
OBJECTIVE = "objective"
DATA = "data"
OPTIMISATION = "optimisation"
BOOKKEEPING = "bookkeeping"
REFUSED = (ARCHITECTURE, OBJECTIVE, DATA)  # never changed by a resume

# class -> section -> the keys of that section in the class
_TABLE: dict[str, dict[str, str]] = {
    ARCHITECTURE: {
        "model": "input_size in_channels patch_size depth hidden_size num_heads mlp_ratio "
                 "num_classes learn_sigma final_conv condition",
        # router_init_std only shapes the initial weights, which the checkpoint replaces.
        # pool_scope: the batch-level pool (DiffMoE) or each sample (expert choice): the model.
        "model.moe": "type num_experts capacity interleave shared_experts granularity "
                     "pool_scope router_init_std",
        "model.text": "encoder dim max_tokens",
    },
    OBJECTIVE: {
        "objective": "type time_scale time_sampling logit_mean logit_std num_timesteps "
                     "beta_start beta_end vb_weight",
    },
    DATA: {
        # The latent normalisation the weights work in (and the VAE's downsampling it implies).
        "data": "name split limit path flip scale_factor shift_factor downsampling",
        "train": "seed",  # the data order (and the initial weights)
    },
    OPTIMISATION: {
        "model": "class_dropout",
        "model.moe": "balance_loss_weight predictor_loss_weight threshold_ema",
        "model.text": "dropout",
        # precision, tf32 and the bf16 gradient reductions change the arithmetic of a step.
        "train": "batch_size lr weight_decay beta1 beta2 warmup_steps lr_schedule grad_clip "
                 "ema_decay ema_buffers ema_warmup precision tf32 fsdp_reduce_dtype "
                 "ddp_bf16_grads grad_accum token_pool",
    },
    BOOKKEEPING: {
        # A preset is a name for values that are compared one by one.
        "model": "preset",
        "model.moe": "dispatch",  # the expert kernel: the same arithmetic, another speed
        # The decoder of the sample grids; where caption embeddings and folder caches live;
        # how a folder is read (the same pixels either way).
        "data": "vae cache_dir in_memory_mb workers",
        # deterministic, like num_threads and compile, changes which kernels run: the rounding.
        "train": "out_dir steps log_every sample_every ckpt_every keep_checkpoints "
                 "nonfinite_loss max_skipped_steps dist_timeout_s max_minutes device compile "
                 "num_threads parallel activation_checkpointing trackers wandb_project "
                 "deterministic",
        "sample": "sampler steps cfg_scale mode threshold batch_size num seed weights ddim_eta "
                  "ode_rtol ode_atol sde_noise guidance_channels precision tf32 compile",
    },
}

KEY_CLASS: dict[str, str] = {f"{section}.{key}": kind for kind, sections in _TABLE.items()
                             for section, keys in sections.items() for key in keys.split()}


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{dotted key: value}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unclassified(config: dict) -> list[str]:
    """The keys of ``config`` (a nested dict) without a class, and classified keys it lacks."""
    keys = set(flatten(config))
    return sorted(keys ^ set(KEY_CLASS))


def key_class(key: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    """The class of ``key`` for a resume from the flat config ``before`` to ``after``."""
    if key == "train.steps" and "cosine" in (before.get("train.lr_schedule"),
                                             after.get("train.lr_schedule")):
        return OPTIMISATION  # the step the cosine schedule decays to 0 at
    return KEY_CLASS[key]


@dataclass(frozen=True)
class Change:
    """One key whose value a resume changes, and its class."""

    key: str
    before: Any
    after: Any
    kind: str

    def __str__(self) -> str:
        return f"{self.key} ({self.before!r} in the checkpoint, {self.after!r} now)"


def config_changes(before: dict, after: dict) -> list[Change]:
    """The keys whose values differ from ``before`` to ``after`` (nested dicts as
    :meth:`Config.to_dict` gives them). A key ``before`` lacks, from a config written before the
    key existed, has its default there; a key the schema no longer has is not compared."""
    old = {**flatten(dataclasses.asdict(Config())), **flatten(before)}
    new = flatten(after)
    return [Change(key, old[key], value, key_class(key, old, new)) for key, value in new.items()
            if old[key] != value]
