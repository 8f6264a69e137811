"""The MoE feed-forward layers as drop-in modules for someone else's transformer: ``(B, s, D)`` in,
the output with its auxiliary losses and its capacity out::

    ffn = DiffMoELayer(dim=256, hidden=1024, num_experts=8, capacity=1.0)
    out = ffn(x_BsD)                           # training: top k = S·C/E of the pool (Eq. 4)
    loss = task_loss + out.predictor_loss      # Eq. 12 (TokenChoiceLayer: + α·out.aux_loss)
    loss.backward(); optimizer.step()
    apply_threshold_updates(diffmoe_layers(model), [out.threshold_targets])  # Eq. 17
    model.eval(); y = ffn(x_BsD).output        # inference: dynamic routing (Eq. 14) by default

or, returning a plain tensor so that it fits anywhere an MLP does (``nn.Sequential``, timm's
``Block(mlp_layer=partial(DiffMoEMlp, num_experts=8))``), each layer keeping its latest
output for the caller::

    y = model(x)                               # DiffMoEMlp layers (or return_tensor=True)
    loss = task_loss + diffmoe.moe_losses(model)   # w·L_predictor (+ α·L_balance), Eq. 12
    loss.backward(); optimizer.step()
    diffmoe.update_thresholds(model)           # Eq. 17, after the optimizer step
    with diffmoe.routing(model.eval(), "dynamic"):  # every layer's inference rule (Eq. 14)
        y = model(x)

Each is a thin wrapper of the layer diffmoe's own DiT uses, built by the same
:func:`~diffmoe.models.moe.build_ffn` from a :class:`~diffmoe.config.MoEConfig` (whose defaults
and checks apply); the wrapped layer is ``.layer``, so ``diffmoe_layers(model)`` finds it.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .capacity import forward_capacity
from .config import INFERENCE_MODES, ModelConfig, MoEConfig, SampleConfig, validate_moe
from .errors import ConfigError
from .loss import weighted_moe_losses
from .models.dit import DYNAMIC
from .models.moe import STATIC, FFNOutput, Routing, apply_threshold_updates, build_ffn


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
    options of ``MoEConfig`` with its defaults (``threshold_ema``, α of Eq. 17, for DiffMoE;
    the loss weights :func:`moe_losses` applies). ``return_tensor``: ``forward`` returns the
    output tensor alone; either way the latest :class:`MoEOutput` is kept as :attr:`last` for
    :func:`moe_losses` and :func:`update_thresholds`. ``default_routing``: the inference rule
    when ``forward`` is given none and no :func:`routing` block sets one."""

    kind: ClassVar[str]
    default_routing: ClassVar[Routing] = STATIC

    def __init__(self, dim: int, hidden: int, num_experts: int,
                 capacity: float = MoEConfig.capacity, *,
                 granularity: int = MoEConfig.granularity,
                 shared_experts: int = MoEConfig.shared_experts,
                 router_init_std: float = MoEConfig.router_init_std,
                 dispatch: str = MoEConfig.dispatch,
                 threshold_ema: float = MoEConfig.threshold_ema,
                 balance_loss_weight: float = MoEConfig.balance_loss_weight,
                 predictor_loss_weight: float = MoEConfig.predictor_loss_weight,
                 return_tensor: bool = False):
        super().__init__()
        moe = MoEConfig(type=self.kind, num_experts=num_experts, capacity=capacity,
                        granularity=granularity, shared_experts=shared_experts,
                        router_init_std=router_init_std, dispatch=dispatch,
                        threshold_ema=threshold_ema, balance_loss_weight=balance_loss_weight,
                        predictor_loss_weight=predictor_loss_weight)
        if dim <= 0 or hidden <= 0:
            raise ConfigError(f"dim={dim} and hidden={hidden} must be positive integers")
        validate_moe(ModelConfig(hidden_size=dim, mlp_ratio=hidden / dim, moe=moe))
        self.moe, self.return_tensor = moe, return_tensor
        self.layer = build_ffn(moe, dim, hidden)
        self.routing: Optional[Routing] = None  # set inside a routing() block
        self.last: Optional[MoEOutput] = None

    def forward(self, x_BsD: Tensor, routing: Optional[Routing] = None
                ) -> Union[MoEOutput, Tensor]:
        """``x_BsD``: (B, s, D) tokens, all B·s of them one pool for DiffMoE. ``routing``: the
        inference rule (ignored in training mode); when None, the rule of an enclosing
        :func:`routing` block, else :attr:`default_routing`."""
        if x_BsD.dim() != 3:
            raise ConfigError(f"the layer takes (batch, tokens, dim) input, got shape "
                              f"{tuple(x_BsD.shape)}; reshape it to three dimensions")
        rule = routing or self.routing or self.default_routing
        out = self.layer(x_BsD, rule)
        zero = x_BsD.new_zeros((), dtype=torch.float32)
        self.last = MoEOutput(
            output=out.y,
            aux_loss=zero if out.aux_loss is None else out.aux_loss,
            predictor_loss=zero if out.predictor_loss is None else out.predictor_loss,
            capacity=forward_capacity([out]), threshold_targets=out.threshold_targets_E,
            details=out)
        return out.y if self.return_tensor else self.last


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


def _gelu(act_layer: Any) -> bool:
    """Whether ``act_layer`` is GELU (the class, or a partial of it such as timm passes)."""
    func = act_layer.func if isinstance(act_layer, functools.partial) else act_layer
    return func is nn.GELU


class DiffMoEMlp(DiffMoELayer):
    """:class:`DiffMoELayer` with timm's ``Mlp`` signature, returning a plain tensor: it fits
    ``timm.models.vision_transformer.Block(mlp_layer=partial(DiffMoEMlp, num_experts=8))`` or
    an ``nn.Sequential``. ``in_features``: the width D; ``hidden_features``: each expert's
    hidden width before fine-graining (default 4·D); ``out_features`` must be D (the experts
    map D to D). The experts are DiT's GELU (tanh) MLPs with biases and no dropout, so
    ``act_layer`` must be GELU, ``bias`` True, ``drop`` 0 and ``norm_layer`` None (what timm's
    Block passes by default). The rest, keyword-only, are :class:`MoEModule`'s options."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer: Any = nn.GELU,
                 norm_layer: Any = None, bias: bool = True, drop: float = 0.0, *,
                 num_experts: int = 8, capacity: float = MoEConfig.capacity, **options: Any):
        if out_features not in (None, in_features):
            raise ConfigError(f"out_features={out_features} differs from in_features="
                              f"{in_features}; a DiffMoE layer maps D to D, so drop "
                              f"out_features or make it {in_features}")
        unsupported = [f"act_layer={getattr(act_layer, '__name__', act_layer)}"] if not (
            act_layer is None or _gelu(act_layer)) else []
        unsupported += [f"norm_layer={norm_layer}"] if norm_layer is not None else []
        unsupported += ["bias=False"] if not bias else []
        unsupported += [f"drop={drop}"] if drop else []
        if unsupported:
            raise ConfigError(f"DiffMoEMlp does not take {', '.join(unsupported)}: its experts "
                              f"are DiT's GELU MLPs with biases, no norm and no dropout; leave "
                              f"these at timm's defaults")
        super().__init__(in_features, hidden_features or 4 * in_features, num_experts,
                         capacity, return_tensor=True, **options)


def drop_in_layers(model: nn.Module) -> list[MoEModule]:
    """The drop-in MoE layers of ``model`` (itself included), in module order."""
    return [m for m in model.modules() if isinstance(m, MoEModule)]


def _layers_or_error(model: nn.Module, what: str) -> list[MoEModule]:
    layers = drop_in_layers(model)
    if not layers:
        raise ConfigError(f"{what} found no DiffMoELayer, DiffMoEMlp, TokenChoiceLayer or "
                          f"ExpertChoiceLayer in {type(model).__name__}; pass the model that "
                          f"holds them")
    return layers


def moe_losses(model: nn.Module) -> Tensor:
    """The weighted auxiliary losses of the latest forward of ``model``'s drop-in layers, to add
    to the task loss: w·L_predictor (Eq. 12) + α·L_balance, each the mean over the layers as
    diffmoe's own training forms them (:func:`diffmoe.loss.weighted_moe_losses`). Call it after
    each forward: a layer keeps only its latest output."""
    layers = _layers_or_error(model, "moe_losses")
    missing = [i for i, m in enumerate(layers) if m.last is None]
    if missing:
        raise ConfigError(f"drop-in layer {missing[0]} of {len(layers)} has not run a forward "
                          f"yet; call moe_losses(model) after the model's forward")
    parts = [sum(weighted_moe_losses(m.last.aux_loss, m.last.predictor_loss, m.moe))
             for m in layers]
    return torch.stack(parts).mean()


def update_thresholds(model: nn.Module) -> None:
    """Eq. 17 for every DiffMoE drop-in layer of ``model`` from the targets its latest training
    forward recorded (averaged over data-parallel ranks under a process group), each target used
    once: call it after the optimizer step, as diffmoe's own training does."""
    layers = [m for m in _layers_or_error(model, "update_thresholds")
              if isinstance(m, DiffMoELayer)]
    recorded = [m for m in layers if m.last is not None and m.last.threshold_targets is not None]
    if len(recorded) != len(layers):
        raise ConfigError(f"{len(layers) - len(recorded)} of {len(layers)} DiffMoE layers have "
                          f"no threshold targets: run a training forward (model.train()) "
                          f"before each update_thresholds(model)")
    apply_threshold_updates([m.layer for m in layers],
                            [m.last.threshold_targets for m in layers])
    for m in layers:
        m.last.threshold_targets = None


@contextlib.contextmanager
def routing(model: nn.Module, mode: Union[str, Routing],
            threshold: float = SampleConfig.threshold) -> Iterator[nn.Module]:
    """Inside the block, every drop-in layer of ``model`` routes by ``mode`` at inference
    (``dynamic``: Eq. 14; ``threshold`` with γ = ``threshold``: Eq. 16; ``static``; ``predictor``;
    or a :class:`~diffmoe.models.moe.Routing`); training forwards keep the training rule. The
    layers' rules are restored on leaving."""
    rule = mode if isinstance(mode, Routing) else None
    if rule is None:
        modes = [m for m in INFERENCE_MODES if m != "auto"]
        if mode not in modes:
            raise ConfigError(f"routing mode {mode!r} is not one of {modes}")
        rule = Routing(mode, threshold)
    layers = _layers_or_error(model, "routing")
    if rule.mode != "static" and not any(isinstance(m, DiffMoELayer) for m in layers):
        raise ConfigError(f"routing mode '{rule.mode}' needs DiffMoE's capacity predictor, and "
                          f"{type(model).__name__} has no DiffMoE layer; use 'static'")
    before = [m.routing for m in layers]
    for m in layers:
        m.routing = rule
    try:
        yield model
    finally:
        for m, old in zip(layers, before):
            m.routing = old
