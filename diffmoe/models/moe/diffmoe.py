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
effect, so activation checkpointing's recomputation and torch.compile need no special case, and a
micro-batch skipped for a non-finite loss leaves τ as it was.

Inference (Eq. 14, 16): expert e processes k_e = #{s : p[s, e] > τ_e} tokens (or > γ for a
constant threshold), and the router decides which: expert e takes its top-k_e tokens by score.
Beyond the paper, ``predictor`` mode lets the predictor choose the tokens too: token s goes to
expert e iff p[s, e] > τ_e, so each token's routing, and each sample's output, is independent of
the other samples of the sampling batch (the counts are those of Eq. 14).

Scope (``scope = "batch"`` or ``"sample"``, ``model.moe.pool_scope``): "batch" is the paper's
DiffMoE. "sample" is the "local" ablation of the paper's Table 4: the training rule is expert
choice within each sample (top k = s·C/E per sample, as EC-MoE), the predictor learns that
selection, the thresholds follow the k-th largest predictions of the pool with k = B·s·C/E (the
selection's size), and dynamic inference counts k_{b,e} = #{s in sample b : p[s, e] > τ_e} and
takes sample b's top k_{b,e} tokens by router score.

Pool scope under torchrun (``pool = "rank"`` or ``"global"``, given at construction; the trainer
builds the model with ``train.token_pool``): with "rank" (the public code) the pool is this rank's
micro-batch; with "global" the router scores and predictor logits of every rank are all-gathered,
each expert takes its top k = S_global·C/E tokens of the global pool, and each rank runs the
chosen tokens it holds.
The gathered scores only decide *which* tokens are chosen (top-k indices carry no gradient); the
weights of Eq. 7 are the local scores, so a plain all-gather gives the same gradients as an
autograd one. The threshold targets q_e are taken over the global pool, so every rank records the
same targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...config import POOL_SCOPES, TOKEN_POOLS
from ..init import InitPlan
from .base import FFNOutput, MoELayer, Routing, expert_capacity, row_experts
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


@dataclass
class Selection:
    """Which tokens each expert processes under the training rule, and with which weights (Eq. 7).

    Equal capacities (the training rule of the rank pool, static inference): ``tokens`` and
    ``weights`` are (E, k), run as one batched matmul without a host synchronisation. Otherwise
    (the global pool) rows grouped by expert with ``counts_E`` rows each, ``host_counts`` the
    same counts read to the host."""

    tokens: Tensor
    weights: Tensor
    counts_E: Tensor
    equal: bool
    host_counts: Optional[list[int]] = None


class DiffMoE(MoELayer):
    def __init__(self, *args, threshold_ema: float = 0.95, pool: str = "rank",
                 scope: str = "batch", **kwargs):
        super().__init__(*args, **kwargs)
        if pool not in TOKEN_POOLS:
            raise ValueError(f"token pool '{pool}' is not one of {TOKEN_POOLS}")
        if scope not in POOL_SCOPES:
            raise ValueError(f"pool scope '{scope}' is not one of {POOL_SCOPES}")
        if scope == "sample" and pool == "global":
            raise ValueError("a per-sample pool scope has no pool to gather across ranks; use "
                             "pool='rank'")
        self.threshold_ema = threshold_ema
        self.predictor = CapacityPredictor(self.dim, self.num_experts)
        self.register_buffer("thresholds_E", torch.zeros(self.num_experts))
        self.pool = pool  # training pool scope under torchrun (see the module docstring)
        self.scope = scope  # the batch-level pool, or each sample (see the module docstring)

    def init_plan(self) -> InitPlan:
        """The router and experts, then τ = 0 (Eq. 17's starting point)."""
        return super().init_plan() + [("thresholds_E", nn.init.zeros_)]

    def route_and_compute(self, x_SD: Tensor, batch: int, routing: Routing) -> FFNOutput:
        """Training: the training rule, its predictor loss and threshold targets. Inference: the
        static rule without the predictor, Eq. 14/16 (:meth:`_run_dynamic`, or per sample), or
        the predictor's own choice (``predictor`` mode)."""
        scores_SE = self.router(x_SD)
        if not self.training and routing.mode == "static":
            return self._run(x_SD, self._equal_selection(scores_SE, batch))
        logits_SE = self.predictor(x_SD)
        if not self.training:
            predicted_SE = predicted_mask(logits_SE, self._inference_thresholds(routing))
            if routing.mode == "predictor":
                return self._run_mask(x_SD, scores_SE, predicted_SE, logits_SE)
            if self.scope == "sample":
                return self._run_mask(x_SD, scores_SE,
                                      per_sample_dynamic_mask(scores_SE, predicted_SE, batch),
                                      logits_SE)
            return self._run_dynamic(x_SD, scores_SE, predicted_SE.sum(0), logits_SE)
        selection, targets_E = self._training_selection(scores_SE, logits_SE, batch)
        out = self._run(x_SD, selection, predictor_logits_SE=logits_SE,
                        # τ as this forward saw it, for the trainer's log (a copy: the trainer
                        # moves τ in place after the step).
                        thresholds_E=self.thresholds_E.detach().clone(),
                        threshold_targets_E=targets_E)
        out.predictor_loss = predictor_loss(logits_SE, out.mask_SE)
        return out

    def _inference_thresholds(self, routing: Routing) -> Tensor:
        """τ (dynamic, Eq. 14, and predictor) or one constant γ for every expert (threshold,
        Eq. 16)."""
        if routing.mode in ("dynamic", "predictor"):
            return self.thresholds_E
        return torch.full_like(self.thresholds_E, routing.threshold)

    def _run(self, x_SD: Tensor, selection: Selection, **fields) -> FFNOutput:
        """The experts on the tokens of a training-rule selection."""
        if selection.equal:
            y_SD = self.run_equal(x_SD, selection.tokens, selection.weights)
        else:
            y_SD = self.run_grouped(x_SD, selection.tokens, selection.weights, selection.counts_E,
                                    selection.host_counts)
        return self.output(y_SD, selection.tokens.reshape(-1), selection.counts_E, **fields)

    # torch.compile runs this eagerly (one graph break per layer): what it does depends on the
    # counts, which it reads to the host, the one host synchronisation of a dynamic layer.
    @torch.compiler.disable
    def _run_dynamic(self, x_SD: Tensor, scores_SE: Tensor, counts_E: Tensor,
                     logits_SE: Tensor) -> FFNOutput:
        """Eq. 14/16 at inference: expert e takes its top ``counts_E[e]`` tokens by router score
        and runs them."""
        counts = counts_E.tolist()
        tok_T, w_T = top_by_score(scores_SE, counts)
        y_SD = self.run_grouped(x_SD, tok_T, w_T, counts_E, host_counts=counts)
        return self.output(y_SD, tok_T, counts_E, predictor_logits_SE=logits_SE)

    # torch.compile runs this eagerly, as _run_dynamic: the counts are read to the host.
    @torch.compiler.disable
    def _run_mask(self, x_SD: Tensor, scores_SE: Tensor, mask_SE: Tensor, logits_SE: Tensor
                  ) -> FFNOutput:
        """Run the tokens a selection mask (S, E) chose, each weighted by its router score (Eq.
        7): rows grouped by expert, each expert's tokens in pool order."""
        counts_E = mask_SE.sum(0)
        counts = counts_E.tolist()  # this layer's one host synchronisation
        rows = torch.nonzero_static(mask_SE.t().reshape(-1), size=sum(counts))[:, 0]
        expert_T, tok_T = rows // mask_SE.shape[0], rows % mask_SE.shape[0]
        y_SD = self.run_grouped(x_SD, tok_T, scores_SE[tok_T, expert_T], counts_E,
                                host_counts=counts)
        return self.output(y_SD, tok_T, counts_E, predictor_logits_SE=logits_SE)

    def _equal_selection(self, scores_SE: Tensor, batch: int) -> Selection:
        """The training rule on this pool of ``batch`` samples: expert e takes its top
        k = S·C/E tokens of the pool, or with the per-sample scope its top s·C/E of each
        sample."""
        S = scores_SE.shape[0]
        if self.scope == "sample":
            k = expert_capacity(S // batch, self.capacity, self.base_experts)
            idx_Ek, w_Ek = per_sample_topk(scores_SE, batch, k)
        else:
            k = expert_capacity(S, self.capacity, self.base_experts)
            w_Ek, idx_Ek = scores_SE.t().topk(k, dim=1)
        counts_E = torch.full((self.num_experts,), idx_Ek.shape[1], dtype=torch.long,
                              device=scores_SE.device)
        return Selection(idx_Ek, w_Ek, counts_E, equal=True)

    def _training_selection(self, scores_SE: Tensor, logits_SE: Tensor, batch: int
                            ) -> tuple[Selection, Tensor]:
        """The training rule over the pool (this rank's, or all ranks' with ``pool="global"``,
        or each sample's with the per-sample scope), and the threshold targets q_e over the same
        pool (for the per-sample scope: the pool's k-th largest, k the selection's size)."""
        if self.pool == "global":
            rank, world = _world()
            if world > 1:
                return self._global_pool_selection(scores_SE, logits_SE, rank, world)
        selection = self._equal_selection(scores_SE, batch)
        with torch.no_grad():
            targets_E = threshold_targets(logits_SE, int(selection.tokens.shape[1]))
        return selection, targets_E

    def _global_pool_selection(self, scores_SE: Tensor, logits_SE: Tensor, rank: int,
                               world: int) -> tuple[Selection, Tensor]:
        """Training rule over the pool of all ranks (G = world·S tokens, equal S per rank):
        expert e takes its top k = G·C/E tokens of the gathered scores; this rank runs the
        chosen tokens it holds (unequal counts per expert) weighted by their local scores."""
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
        rows = sum(counts)
        # Row-major: grouped by expert.
        tok_T = idx_Ek.reshape(-1)[torch.nonzero_static(mine_Ek.reshape(-1), size=rows)[:, 0]]
        expert_T = row_experts(counts_E, self.num_experts, rows)
        with torch.no_grad():
            targets_E = threshold_targets(logits_GE, k)
        selection = Selection(tok_T, scores_SE[tok_T, expert_T], counts_E, equal=False,
                              host_counts=counts)
        return selection, targets_E


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
