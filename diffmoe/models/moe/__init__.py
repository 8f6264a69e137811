"""Feed-forward variants behind one interface: ``layer(x_BsD, routing) -> FFNOutput``.

=================  ==========================================================================
``dense``          :class:`DenseFFN` — the ordinary DiT MLP
``token_choice``   :class:`TokenChoiceMoE` — top-K experts per token, load-balance loss
``expert_choice``  :class:`ExpertChoiceMoE` — each expert takes top-k tokens within each sample
``diffmoe``        :class:`DiffMoE` — expert choice over the batch-level global pool (Eq. 4-7),
                   capacity predictor and thresholds (Eq. 12-17); :class:`SamplePoolDiffMoE`
                   (``pool_scope: sample``) expert choice within each sample with the same
                   predictor (Table 4's "local"); :class:`GlobalPoolDiffMoE`
                   (``train.token_pool: global``) the pool of all ranks
=================  ==========================================================================
"""

from __future__ import annotations

import torch.nn as nn

from ...config import MoEConfig
from .base import (
    STATIC,
    DenseFFN,
    ExpertBank,
    FeedForward,
    FFNOutput,
    MoELayer,
    Routing,
    cast_experts_once,
    compute_dtype,
    expert_capacity,
)
from .diffmoe import (
    CapacityPredictor,
    DiffMoE,
    GlobalPoolDiffMoE,
    SamplePoolDiffMoE,
    apply_threshold_updates,
    checkpoint_keeping_choices,
    diffmoe_layer,
    diffmoe_layers,
    gathers_pool,
)
from .expert_choice import ExpertChoiceMoE
from .token_choice import TokenChoiceMoE

LAYERS = {"token_choice": TokenChoiceMoE, "expert_choice": ExpertChoiceMoE,
          "diffmoe": diffmoe_layer}


def build_ffn(moe: MoEConfig, dim: int, hidden: int, token_pool: str = "rank") -> nn.Module:
    """The feed-forward layer of one MoE position for ``moe.type``; ``token_pool`` is a DiffMoE
    layer's training pool under torchrun ("rank" or "global", see :mod:`.diffmoe`)."""
    if moe.type == "dense":
        return DenseFFN(dim, hidden)
    kwargs = dict(num_experts=moe.num_experts, capacity=moe.capacity,
                  granularity=moe.granularity, shared_experts=moe.shared_experts,
                  router_init_std=moe.router_init_std, dispatch=moe.dispatch)
    if moe.type == "diffmoe":
        kwargs.update(threshold_ema=moe.threshold_ema, pool=token_pool, scope=moe.pool_scope)
    return LAYERS[moe.type](dim, hidden, **kwargs)


__all__ = ["STATIC", "CapacityPredictor", "DenseFFN", "DiffMoE", "ExpertBank",
           "ExpertChoiceMoE", "FFNOutput", "FeedForward", "GlobalPoolDiffMoE", "MoELayer",
           "Routing", "SamplePoolDiffMoE", "TokenChoiceMoE", "apply_threshold_updates",
           "build_ffn", "cast_experts_once", "checkpoint_keeping_choices", "compute_dtype",
           "diffmoe_layers", "expert_capacity", "gathers_pool"]
