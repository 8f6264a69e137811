"""The training loss, formed in one place:

    L = L_diffusion + α · L_balance + w · L_predictor

L_diffusion is the objective's (flow-matching MSE, or DDPM L_simple + vb_weight·L_vb;
:mod:`diffmoe.diffusion`). L_balance is token choice's load-balance loss and L_predictor the
capacity predictor's BCE (Eq. 12), each the mean over the model's MoE layers
(:class:`~diffmoe.models.dit.DiTOutput`); α = ``model.moe.balance_loss_weight``, w =
``model.moe.predictor_loss_weight``. Nothing else reads those two weights: the drop-in layers'
:func:`diffmoe.layers.moe_losses` weighs through :func:`weighted_moe_losses` too.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .config import MoEConfig
from .diffusion import ObjectiveLoss
from .models.dit import DiTOutput


@dataclass
class TrainingLoss:
    """loss: what to backpropagate. The other tensors are its (weighted) parts, detached, for
    logging; model_output is the model's output."""

    loss: Tensor
    diffusion_loss: Tensor
    aux_loss: Tensor
    predictor_loss: Tensor
    model_output: DiTOutput


def weighted_moe_losses(aux_loss: Tensor, predictor_loss: Tensor, moe: MoEConfig
                        ) -> tuple[Tensor, Tensor]:
    """(α · L_balance, w · L_predictor) with the weights of ``moe``."""
    return moe.balance_loss_weight * aux_loss, moe.predictor_loss_weight * predictor_loss


def training_loss(objective_loss: ObjectiveLoss, moe: MoEConfig) -> TrainingLoss:
    out: DiTOutput = objective_loss.model_output
    aux, predictor = weighted_moe_losses(out.aux_loss, out.predictor_loss, moe)
    diffusion = objective_loss.diffusion_loss
    return TrainingLoss(loss=diffusion + aux + predictor, diffusion_loss=diffusion.detach(),
                        aux_loss=aux.detach(), predictor_loss=predictor.detach(),
                        model_output=out)
