"""The MoE feed-forward layers as drop-in modules for someone else's transformer: ``(B, s, D)`` in,
the output with its auxiliary losses and its capacity out::

    ffn = DiffMoELayer(dim=256, hidden=1024, num_experts=8, capacity=1.0)
    out = ffn(x_BsD)                           # training: top k = S·C/E of the pool (Eq. 4)
    loss = task_loss + out.predictor_loss      # Eq. 12 (TokenChoiceLayer: + α·out.aux_loss)
    loss.backward(); optimizer.step()
    apply_threshold_updates(diffmoe_layers(model), [out.threshold_targets])  # Eq. 17
    model.eval(); y = ffn(x_BsD).output        # inference: dynamic routing (Eq. 14) by default

Each is a thin wrapper of the layer diffmoe's own DiT uses, built by the same
:func:`~diffmoe.models.moe.build_ffn` from a :class:`~diffmoe.config.MoEConfig` (whose defaults
and checks apply); the wrapped layer is ``.layer``, so ``diffmoe_layers(model)`` finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .capacity import forward_capacity
from .config import ModelConfig, MoEConfig, validate_moe
from .errors import ConfigError
from .models.dit import DYNAMIC
from .models.moe import STATIC, FFNOutput, Routing, build_ffn


@dataclass
class MoEOutput:
    """What a drop-in layer returns.

    output: (B, s, D). aux_loss: the token-choice load-balance loss, unweighted (0 for the other
    layers). predictor_loss: DiffMoE's capacity-predictor BCE (Eq. 12; 0 when the predictor did
    not run). capacity: C of this forward (Eq. 9), a 0-d tensor. threshold_targets: q_e (Eq. 17)
    that a DiffMoE training forward recorded, for ``apply_threshold_updates``; None otherwise.
    details: the wrapped layer's :class:`~diffmoe.models.moe.FFNOutput` (selection mask, counts).
    """

    output: Tensor
    aux_loss: Tensor
    predictor_loss: Tensor
    capacity: Tensor
    threshold_targets: Optional[Tensor]
    details: FFNOutput


class MoEModule(nn.Module):
    """A routed feed-forward layer of ``kind`` as a standalone module (see the module
    docstring): width ``dim``, expert hidden width ``hidden`` (before fine-graining), the
    options of ``MoEConfig`` with its defaults (``threshold_ema``, α of Eq. 17, for DiffMoE).
    ``default_routing``: the inference rule when ``forward`` is given none."""

    kind: ClassVar[str]
    default_routing: ClassVar[Routing] = STATIC

    def __init__(self, dim: int, hidden: int, num_experts: int,
                 capacity: float = MoEConfig.capacity, *,
                 granularity: int = MoEConfig.granularity,
                 shared_experts: int = MoEConfig.shared_experts,
                 router_init_std: float = MoEConfig.router_init_std,
                 dispatch: str = MoEConfig.dispatch,
                 threshold_ema: float = MoEConfig.threshold_ema):
        super().__init__()
        moe = MoEConfig(type=self.kind, num_experts=num_experts, capacity=capacity,
                        granularity=granularity, shared_experts=shared_experts,
                        router_init_std=router_init_std, dispatch=dispatch,
                        threshold_ema=threshold_ema)
        if dim <= 0 or hidden <= 0:
            raise ConfigError(f"dim={dim} and hidden={hidden} must be positive integers")
        validate_moe(ModelConfig(hidden_size=dim, mlp_ratio=hidden / dim, moe=moe))
        self.layer = build_ffn(moe, dim, hidden)

    def forward(self, x_BsD: Tensor, routing: Optional[Routing] = None) -> MoEOutput:
        """``x_BsD``: (B, s, D) tokens, all B·s of them one pool for DiffMoE. ``routing``: the
        inference rule (ignored in training mode), :attr:`default_routing` when None."""
        if x_BsD.dim() != 3:
            raise ConfigError(f"the layer takes (batch, tokens, dim) input, got shape "
                              f"{tuple(x_BsD.shape)}; reshape it to three dimensions")
        out = self.layer(x_BsD, self.default_routing if routing is None else routing)
        zero = x_BsD.new_zeros((), dtype=torch.float32)
        return MoEOutput(
            output=out.y,
            aux_loss=zero if out.aux_loss is None else out.aux_loss,
            predictor_loss=zero if out.predictor_loss is None else out.predictor_loss,
            capacity=forward_capacity([out]), threshold_targets=out.threshold_targets_E,
            details=out)


class DiffMoELayer(MoEModule):
    """DiffMoE (paper §2-4): expert choice over the batch-level pool in training, the capacity
    predictor and learned thresholds at inference, which is dynamic (Eq. 14) unless another
    routing is passed."""

    kind = "diffmoe"
    default_routing = DYNAMIC


class TokenChoiceLayer(MoEModule):
    """Token choice (TC-MoE): each token takes its top-C experts; add α·``aux_loss`` to the
    loss (``MoEConfig.balance_loss_weight`` is the paper's α)."""

    kind = "token_choice"


class ExpertChoiceLayer(MoEModule):
    """Expert choice within each sample (EC-MoE): each expert takes the top s·C/E tokens of every
    sample; no auxiliary loss."""

    kind = "expert_choice"
