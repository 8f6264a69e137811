"""DiffMoE: expert choice over the batch-level global token pool, with a capacity predictor and
per-expert thresholds (paper §2–4).

Training (Eq. 4-7): the (B, s, D) input is flattened into one pool of S = B·s tokens; each expert
takes the top k = S·C/E tokens of the *whole pool* by its router score, so tokens of different
samples (and noise levels) compete. Tokens chosen by no expert get zero FFN output.

Capacity predictor (Eq. 12-13): a 2-layer MLP on the detached pool predicts the selection mask O;
its BCE loss trains only the predictor. Thresholds (Eq. 17): τ_e ← α·τ_e + (1−α)·q_e with q_e the
k-th largest sigmoid(prediction) of expert e. A training forward only records q_e (in its
:class:`FFNOutput`); the trainer applies Eq. 17 to every layer with :func:`apply_threshold_updates`
once per micro-batch it keeps, averaged over ranks in one collective. The forward has no side
effect, so torch.compile needs no special case, activation checkpointing's recomputation computes
the forward's values, and a micro-batch skipped for a non-finite loss leaves τ as it was.

Inference (Eq. 14, 16): expert e processes k_e = #{s : p[s, e] > τ_e} tokens (or > γ for a
constant threshold), and the router decides which: expert e takes its top-k_e tokens by score.
Beyond the paper, ``predictor`` mode lets the predictor choose the tokens too: token s goes to
expert e iff p[s, e] > τ_e, so each token's routing, and each sample's output, is independent of
the other samples of the sampling batch (the counts are those of Eq. 14).

:class:`DiffMoE` is the paper's layer, its training forward and its inference forward each read
in order. The variants beyond the paper are subclasses beside it, built by :func:`diffmoe_layer`:

* :class:`SamplePoolDiffMoE` (``model.moe.pool_scope: sample``), the "local" ablation of the
  paper's Table 4: expert choice within each sample.
* :class:`GlobalPoolDiffMoE` (``train.token_pool: global``): under torchrun the pool of all
  ranks, where the paper's (and the public code's) pool is this rank's micro-batch.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from ...config import POOL_SCOPES, TOKEN_POOLS
from ..init import InitPlan
from .base import Choice, FFNOutput, MoELayer, Routing, expert_capacity, row_experts, selection_mask
from .expert_choice import per_sample_topk


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) of all ranks along dim 0, rank order.
    Not differentiable: used for selections and threshold targets only."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class CapacityPredictor(nn.Module):
    """Linear(D, D) → SiLU → Linear(D, E) on the detached pool (stop-gradient: it never changes
    the diffusion model's gradients)."""

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, num_experts)

    def forward(self, x_SD: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x_SD.detach())))


def predictor_loss(logits_SE: Tensor, mask_SE: Tensor) -> Tensor:
    """Eq. 12: binary cross-entropy between predictor logits and the selection mask O (Eq. 13),
    averaged over all S·E entries."""
    return F.binary_cross_entropy_with_logits(logits_SE.float(), mask_SE.float())


def threshold_targets(logits_SE: Tensor, k: int) -> Tensor:
    """q_e: the k-th largest sigmoid(logit) of each expert over the pool (Eq. 17), vectorised."""
    probs_SE = torch.sigmoid(logits_SE.detach().float())
    S = probs_SE.shape[0]
    return probs_SE.kthvalue(S - k + 1, dim=0).values


def update_thresholds(tau_E: Tensor, q_E: Tensor, alpha: float) -> None:
    """Eq. 17: τ_e ← α·τ_e + (1−α)·q_e, in place."""
    tau_E.mul_(alpha).add_(q_E.to(tau_E.dtype), alpha=1.0 - alpha)


def predicted_mask(logits_SE: Tensor, thresholds_E: Tensor) -> Tensor:
    """Where the predictor expects expert e to take token s: sigmoid(logit[s, e]) > τ_e."""
    return torch.sigmoid(logits_SE.float()) > thresholds_E


def dynamic_counts(logits_SE: Tensor, thresholds_E: Tensor) -> Tensor:
    """Eq. 14: k_e = #{s : sigmoid(logit[s, e]) > τ_e}."""
    return predicted_mask(logits_SE, thresholds_E).sum(0)


def per_sample_dynamic_mask(scores_SE: Tensor, predicted_SE: Tensor, batch: int) -> Tensor:
    """Eq. 14 within each sample (``pool_scope: sample``): in each of the ``batch`` samples,
    expert e takes the top k_{b,e} = #{s in b : predicted[s, e]} tokens of that sample by router
    score. Returns the selection mask (S, E)."""
    S, E = scores_SE.shape
    s = S // batch
    counts_BE = predicted_SE.view(batch, s, E).sum(1)
    order_BsE = scores_SE.view(batch, s, E).argsort(dim=1, descending=True, stable=True)
    rank_BsE = order_BsE.argsort(dim=1, stable=True)  # each token's place in its sample, per e
    return (rank_BsE < counts_BE.unsqueeze(1)).view(S, E)


def top_by_score(scores_SE: Tensor, counts: list[int]) -> tuple[Tensor, Tensor]:
    """Expert e takes its ``counts[e]`` highest-scoring tokens, by ``topk`` on its score column
    as the authors' code does (so ties fall as theirs). Returns the chosen token indices grouped
    by expert and their scores."""
    chosen = [scores_SE[:, e].topk(k) for e, k in enumerate(counts)]
    return torch.cat([c.indices for c in chosen]), torch.cat([c.values for c in chosen])


class DiffMoE(MoELayer):
    """The paper's layer: expert choice over the batch-level pool (Eq. 4-7), the capacity
    predictor (Eq. 12-13) and per-expert thresholds for dynamic inference (Eq. 14, 16, 17).

    The variants beyond the paper override one step each: :class:`SamplePoolDiffMoE` (pool
    scope "sample") :meth:`choose` and :meth:`dynamic_choice`, :class:`GlobalPoolDiffMoE` (the
    pool of all ranks) :meth:`training_choice`; ``predictor`` routing is :func:`predictor_choice`
    in place of :meth:`dynamic_choice`."""

    def __init__(self, *args, threshold_ema: float = 0.95, **kwargs):
        super().__init__(*args, **kwargs)
        self.threshold_ema = threshold_ema
        self.predictor = CapacityPredictor(self.dim, self.num_experts)
        self.register_buffer("thresholds_E", torch.zeros(self.num_experts))

    def init_plan(self) -> InitPlan:
        """The router and experts, then τ = 0 (Eq. 17's starting point)."""
        return super().init_plan() + [("thresholds_E", nn.init.zeros_)]

    def route_and_compute(self, x_SD: Tensor, batch: int, routing: Routing) -> FFNOutput:
        if self.training:
            return self.forward_train(x_SD, batch)
        return self.forward_infer(x_SD, batch, routing)

    def forward_train(self, x_SD: Tensor, batch: int) -> FFNOutput:
        """Training (§2-3): the pool x_SD is all S = B·s tokens of the batch (Eq. 4)."""
        scores_SE = self.router(x_SD)  # Eq. 5-6
        logits_SE = self.predictor(x_SD)  # on the detached pool
        choice, q_E = self.training_choice(scores_SE, logits_SE, batch)  # top-k of each expert
        y_SD = self.run(x_SD, choice)  # the experts on their tokens, combined by Eq. 7
        mask_SE = selection_mask(choice.tokens.reshape(-1), choice.counts_E, x_SD.shape[0])
        return self.output(y_SD, choice, predictor_loss=predictor_loss(logits_SE, mask_SE),
                           predictor_logits_SE=logits_SE, threshold_targets_E=q_E)

    def training_choice(self, scores_SE: Tensor, logits_SE: Tensor, batch: int
                        ) -> tuple[Choice, Tensor]:
        """The training rule (:meth:`choose`), and q_e of Eq. 17 over the same pool: the k-th
        largest predicted probability of expert e, k the tokens each expert took."""
        choice = self.choose(scores_SE, batch)
        with torch.no_grad():
            return choice, threshold_targets(logits_SE, int(choice.tokens.shape[1]))

    def choose(self, scores_SE: Tensor, batch: int) -> Choice:
        """The training rule (§2, step 3), also static inference's: expert e takes its top
        k = S·C/E tokens of the pool by router score."""
        k = expert_capacity(scores_SE.shape[0], self.capacity, self.base_experts)
        w_Ek, idx_Ek = scores_SE.t().topk(k, dim=1)
        return Choice.top_k(idx_Ek, w_Ek)

    def forward_infer(self, x_SD: Tensor, batch: int, routing: Routing) -> FFNOutput:
        """Inference (§4): the training rule (``static``), or Eq. 14/16 (``dynamic``,
        ``threshold``) or the predictor's own choice (``predictor``)."""
        scores_SE = self.router(x_SD)
        if routing.mode == "static":
            choice = self.choose(scores_SE, batch)
            return self.output(self.run(x_SD, choice), choice)
        logits_SE = self.predictor(x_SD)
        thresholds_E = (self.thresholds_E if routing.mode in ("dynamic", "predictor") else
                        torch.full_like(self.thresholds_E, routing.threshold))  # τ, or γ
        predicted_SE = predicted_mask(logits_SE, thresholds_E)
        rule = predictor_choice if routing.mode == "predictor" else self.dynamic_choice
        return self.run_dynamic(x_SD, scores_SE, predicted_SE, logits_SE, batch, rule)

    # torch.compile runs this eagerly (one graph break per layer): what it does depends on the
    # counts, which it reads to the host, the one host synchronisation of a dynamic layer.
    @torch.compiler.disable
    def run_dynamic(self, x_SD: Tensor, scores_SE: Tensor, predicted_SE: Tensor,
                    logits_SE: Tensor, batch: int, rule: Callable[..., Choice]) -> FFNOutput:
        """The experts on the tokens ``rule`` picks from the scores and the predicted mask."""
        choice = rule(scores_SE, predicted_SE, batch)
        return self.output(self.run(x_SD, choice), choice, predictor_logits_SE=logits_SE)

    def dynamic_choice(self, scores_SE: Tensor, predicted_SE: Tensor, batch: int) -> Choice:
        """Eq. 14: k_e = #{s : sigmoid(logit[s, e]) > τ_e}; expert e takes its top k_e tokens
        by router score."""
        counts_E = predicted_SE.sum(0)
        counts = counts_E.tolist()
        tok_T, w_T = top_by_score(scores_SE, counts)
        return Choice(tok_T, w_T, counts_E, counts)


def mask_choice(scores_SE: Tensor, mask_SE: Tensor) -> Choice:
    """The tokens a selection mask (S, E) chose, each weighted by its router score (Eq. 7):
    rows grouped by expert, each expert's tokens in pool order."""
    counts_E = mask_SE.sum(0)
    counts = counts_E.tolist()  # this layer's one host synchronisation
    rows = torch.nonzero_static(mask_SE.t().reshape(-1), size=sum(counts))[:, 0]
    expert_T, tok_T = rows // mask_SE.shape[0], rows % mask_SE.shape[0]
    return Choice(tok_T, scores_SE[tok_T, expert_T], counts_E, counts)


def predictor_choice(scores_SE: Tensor, predicted_SE: Tensor, batch: int) -> Choice:
    """``predictor`` routing (beyond the paper): token s goes to expert e iff the predictor
    expects it, sigmoid(logit[s, e]) > τ_e, so no token's routing depends on the other samples
    of the batch (the counts are those of Eq. 14)."""
    return mask_choice(scores_SE, predicted_SE)


class SamplePoolDiffMoE(DiffMoE):
    """``pool_scope: sample``, the "local" ablation of the paper's Table 4: the training rule is
    expert choice within each sample (top k = s·C/E per sample, as EC-MoE), the predictor learns
    that selection, the thresholds follow the k-th largest predictions of the pool with
    k = B·s·C/E (the selection's size), and dynamic inference counts
    k_{b,e} = #{s in sample b : p[s, e] > τ_e} and takes sample b's top k_{b,e} tokens by router
    score."""

    def choose(self, scores_SE: Tensor, batch: int) -> Choice:
        k = expert_capacity(scores_SE.shape[0] // batch, self.capacity, self.base_experts)
        return Choice.top_k(*per_sample_topk(scores_SE, batch, k))

    def dynamic_choice(self, scores_SE: Tensor, predicted_SE: Tensor, batch: int) -> Choice:
        return mask_choice(scores_SE, per_sample_dynamic_mask(scores_SE, predicted_SE, batch))


class GlobalPoolDiffMoE(DiffMoE):
    """``train.token_pool: global`` (the trainer builds the model with it): under torchrun the
    router scores and predictor logits of every rank are all-gathered, each expert takes its top
    k = S_global·C/E tokens of the global pool, and each rank runs the chosen tokens it holds.
    Alone (one process) it is :class:`DiffMoE`.

    The gathered scores only decide *which* tokens are chosen (top-k indices carry no gradient);
    the weights of Eq. 7 are the local scores, so a plain all-gather gives the same gradients as
    an autograd one. The threshold targets q_e are taken over the global pool, so every rank
    records the same targets. Under activation checkpointing the recompute in the backward must
    not gather again (a collective there interleaves with DDP's gradient all-reduces, in an
    order that can differ between ranks): the forward of each checkpointed block keeps its
    choice, which its recompute reuses (:func:`checkpoint_keeping_choices`)."""

    @property
    def gathers_pool(self) -> bool:
        """Whether training gathers the pool across ranks (a process group of several ranks)."""
        return _world()[1] > 1

    def training_choice(self, scores_SE: Tensor, logits_SE: Tensor, batch: int
                        ) -> tuple[Choice, Tensor]:
        """Training rule over the pool of all ranks (G = world·S tokens, equal S per rank):
        expert e takes its top k = G·C/E tokens of the gathered scores; this rank runs the
        chosen tokens it holds (unequal counts per expert) weighted by their local scores.
        Inside a checkpointed call (:class:`RecomputeChoices`) the recompute reuses the
        forward's choice instead of gathering again."""
        if not self.gathers_pool:
            return super().training_choice(scores_SE, logits_SE, batch)
        kept = _ACTIVE_CHOICES.get()
        if kept is not None and kept.replaying:
            choice = kept.take(self, scores_SE.shape[0])
        else:
            choice = self.global_choice(scores_SE, logits_SE, *_world())
            if kept is not None:
                kept.keep(self, choice)
        expert_T = row_experts(choice.counts_E, self.num_experts, choice.tokens_T.shape[0])
        return (Choice(choice.tokens_T, scores_SE[choice.tokens_T, expert_T], choice.counts_E,
                       choice.host_counts), choice.targets_E)

    def global_choice(self, scores_SE: Tensor, logits_SE: Tensor, rank: int, world: int
                      ) -> "GlobalChoice":
        """Which of this rank's tokens each expert takes from the gathered pool, and the
        threshold targets over that pool: two all-gathers and one host synchronisation."""
        S = scores_SE.shape[0]
        with torch.no_grad():
            scores_GE = all_gather_rows(scores_SE.detach())
            logits_GE = all_gather_rows(logits_SE.detach())
            G = scores_GE.shape[0]
            k = expert_capacity(G, self.capacity, self.base_experts)
            idx_Ek = scores_GE.t().topk(k, dim=1).indices - rank * S
            mine_Ek = (idx_Ek >= 0) & (idx_Ek < S)
            counts_E = mine_Ek.sum(1)
            counts = counts_E.tolist()  # this layer's one host synchronisation
            # Row-major: grouped by expert.
            tok_T = idx_Ek.reshape(-1)[torch.nonzero_static(mine_Ek.reshape(-1),
                                                            size=sum(counts))[:, 0]]
            return GlobalChoice(tok_T, counts_E, counts, threshold_targets(logits_GE, k), S)


def diffmoe_layer(*args, pool: str = "rank", scope: str = "batch", **kwargs) -> DiffMoE:
    """The DiffMoE layer for a pool scope (``model.moe.pool_scope``: "batch", the paper's, or
    "sample") and a training pool under torchrun (``train.token_pool``: "rank" or "global")."""
    if pool not in TOKEN_POOLS:
        raise ValueError(f"token pool '{pool}' is not one of {TOKEN_POOLS}")
    if scope not in POOL_SCOPES:
        raise ValueError(f"pool scope '{scope}' is not one of {POOL_SCOPES}")
    if scope == "sample" and pool == "global":
        raise ValueError("a per-sample pool scope has no pool to gather across ranks; use "
                         "pool='rank'")
    if scope == "sample":
        return SamplePoolDiffMoE(*args, **kwargs)
    return (GlobalPoolDiffMoE if pool == "global" else DiffMoE)(*args, **kwargs)


@dataclass
class GlobalChoice:
    """What the global pool decided for one rank in one forward (none of it differentiable):
    its chosen tokens grouped by expert (``counts_E``, and the same counts on the host) and the
    threshold targets over the whole pool. ``pool``: the rank's token count it was taken for."""

    tokens_T: Tensor
    counts_E: Tensor
    host_counts: list[int]
    targets_E: Tensor
    pool: int


# The RecomputeChoices of the checkpointed call running now (its forward or its recompute).
_ACTIVE_CHOICES: ContextVar[Optional["RecomputeChoices"]] = ContextVar("diffmoe_recompute_choices",
                                                                       default=None)


class RecomputeChoices:
    """The global-pool choices of one call under activation checkpointing, for
    ``torch.utils.checkpoint``'s ``context_fn`` (:meth:`contexts`).

    The forward of the checkpointed call keeps each DiffMoE layer's :class:`GlobalChoice`; its
    recompute in the backward takes them back in the same order instead of gathering again. So
    the backward issues no collective of its own (one issued there would interleave with DDP's
    gradient all-reduces, in an order that can differ between ranks: a hang), and needs no host
    synchronisation either; the recompute runs the forward's selection, so it computes exactly
    the forward's values. Nothing outlives the call's autograd graph: the object belongs to that
    one call, and the model's state is not touched. Until the backward it holds each layer's
    chosen token indices (8 bytes a routed row, against the D-wide rows checkpointing frees)."""

    def __init__(self) -> None:
        self.kept: list[tuple[DiffMoE, GlobalChoice]] = []
        self.replaying = False
        self.cursor = 0

    def contexts(self) -> tuple["_ChoicePhase", "_ChoicePhase"]:
        """(forward context, recompute context), as ``context_fn`` returns them."""
        return _ChoicePhase(self, replay=False), _ChoicePhase(self, replay=True)

    def keep(self, layer: DiffMoE, choice: GlobalChoice) -> None:
        self.kept.append((layer, choice))

    def take(self, layer: DiffMoE, pool: int) -> GlobalChoice:
        """The next kept choice, which must be this layer's for a pool of the same size."""
        if self.cursor >= len(self.kept):
            raise RuntimeError(f"the recompute of a checkpointed call ran {self.cursor + 1} "
                               f"global-pool DiffMoE layers; its forward ran {len(self.kept)}")
        kept_layer, choice = self.kept[self.cursor]
        if kept_layer is not layer or choice.pool != pool:
            raise RuntimeError(f"the recompute of a checkpointed call does not run the DiffMoE "
                               f"layers of its forward in order on pools of the same size "
                               f"(global-pool layer {self.cursor}: a pool of {pool} tokens, the "
                               f"forward's had {choice.pool})")
        self.cursor += 1
        return choice


class _ChoicePhase:
    """Makes a :class:`RecomputeChoices` the active one, keeping (forward) or replaying
    (recompute: from the first kept choice, at each of possibly several backwards)."""

    def __init__(self, choices: RecomputeChoices, replay: bool):
        self.choices, self.replay = choices, replay
        self.tokens: list[Token] = []

    def __enter__(self) -> None:
        self.choices.replaying, self.choices.cursor = self.replay, 0
        self.tokens.append(_ACTIVE_CHOICES.set(self.choices))

    def __exit__(self, *exc) -> None:
        _ACTIVE_CHOICES.reset(self.tokens.pop())


def gathers_pool(module: nn.Module) -> bool:
    """Whether a DiffMoE layer of ``module`` gathers its training pool across ranks."""
    return any(isinstance(m, GlobalPoolDiffMoE) and m.gathers_pool for m in module.modules())


# torch.compile runs this eagerly: its checkpoint refuses a context_fn that is not a dispatch
# mode, and the layer's host synchronisation (the counts) breaks the graph there anyway.
@torch.compiler.disable
def checkpoint_keeping_choices(module: nn.Module, *args: Any) -> Any:
    """``module(*args)`` under non-reentrant activation checkpointing whose recompute reuses the
    forward's global-pool choices (a fresh :class:`RecomputeChoices` for this call), so the
    backward issues no collective of the layer's."""
    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False,
                                             context_fn=lambda: RecomputeChoices().contexts())


def apply_threshold_updates(layers: Sequence["DiffMoE"], targets: Sequence[Tensor],
                            average_over_ranks: bool = True, keep: Optional[Tensor] = None
                            ) -> None:
    """Eq. 17 for every DiffMoE layer of a model, from the targets q_e its training forward
    recorded (``FFNOutput.threshold_targets_E``, in layer order). Under a process group (and
    ``average_over_ranks``) the targets are first averaged over the data-parallel ranks in one
    collective, so every rank makes the same update; τ being a linear EMA of q, this equals
    averaging the ranks' updated τ. ``keep`` (a 0-d bool tensor): where false, τ stays as it is
    (a skipped training step), decided on the device."""
    layers, targets = list(layers), list(targets)
    if len(layers) != len(targets):
        raise ValueError(f"{len(targets)} threshold targets for {len(layers)} DiffMoE layers")
    if not layers:
        return
    with torch.no_grad():
        flat = torch.cat([q.detach().float().to(layers[0].thresholds_E.device) for q in targets])
        if (average_over_ranks and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= dist.get_world_size()
        for m, q_E in zip(layers, flat.split([m.thresholds_E.numel() for m in layers])):
            if keep is None:
                update_thresholds(m.thresholds_E, q_E, m.threshold_ema)
            else:
                updated = m.thresholds_E.clone()
                update_thresholds(updated, q_E, m.threshold_ema)
                m.thresholds_E.copy_(torch.where(keep, updated, m.thresholds_E))


def diffmoe_layers(model: nn.Module) -> list[DiffMoE]:
    return [m for m in model.modules() if isinstance(m, DiffMoE)]
