"""What every feed-forward variant shares: its result type, the dense FFN, the stacked expert
bank with its dispatch kernels, and the router.

Shape suffixes (as in torchtitan): B samples, s tokens per sample, S = B*s tokens in the pool,
D model width, F expert hidden width, E experts in the layer, k tokens per expert (equal
capacities), T routed rows (unequal capacities, rows grouped by expert).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...config import ROUTING_MODES


@dataclass(frozen=True)
class Routing:
    """How MoE layers route at inference (paper §4). Ignored in training mode, which always
    uses the training rule.

    * ``static``: the training rule (top-k with k = S*C/E for expert choice).
    * ``dynamic``: expert e takes k_e = #{p[:, e] > tau_e} tokens (Eq. 14), picked by the router.
    * ``threshold``: as dynamic with one constant threshold gamma for all experts (Eq. 16).
    """

    mode: str = "static"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"routing mode '{self.mode}' is not one of {ROUTING_MODES}")


STATIC = Routing("static")


@dataclass
class FFNOutput:
    """Everything a feed-forward layer produced, returned explicitly.

    y: the layer output (B, s, D). The other fields are None for a dense layer.
    aux_loss: token-choice load-balance loss (unweighted), a scalar.
    predictor_loss: capacity-predictor BCE (Eq. 12) for this layer, a scalar.
    mask_SE: selection mask O (Eq. 13), True where expert e processed token s.
    predictor_logits_SE: capacity-predictor logits.
    counts_E: tokens processed per expert, k_e.
    thresholds_E: the thresholds τ a training forward saw (DiffMoE), for the trainer's log.
    threshold_targets_E: q_e of Eq. 17 over the training pool (DiffMoE in training mode). The
        forward only records them; ``apply_threshold_updates`` moves the thresholds.
    num_tokens: S, the pool the counts refer to.
    base_experts: E before fine-graining, the E of the capacity formula (Eq. 8).
    """

    y: Tensor
    aux_loss: Optional[Tensor] = None
    predictor_loss: Optional[Tensor] = None
    mask_SE: Optional[Tensor] = None
    predictor_logits_SE: Optional[Tensor] = None
    counts_E: Optional[Tensor] = None
    thresholds_E: Optional[Tensor] = None
    threshold_targets_E: Optional[Tensor] = None
    num_tokens: int = 0
    base_experts: int = 1


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def expert_capacity(num_tokens: int, capacity: float, num_experts: int) -> int:
    """Tokens each expert takes under the training rule: k = S*C/E (paper §2, step 3),
    rounded down and kept within [1, S]."""
    return max(1, min(num_tokens, int(num_tokens * capacity / num_experts)))


class FeedForward(nn.Module):
    """The DiT MLP: Linear(D, F) -> GELU(tanh) -> Linear(F, D), with biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


def grouped_mm_supported(*tensors: Tensor) -> bool:
    """torch's grouped_mm needs 16-byte aligned row strides (and exists only in recent torch)."""
    if not hasattr(F, "grouped_mm"):
        return False
    return all((t.shape[-1] * t.element_size()) % 16 == 0 for t in tensors)


class ExpertBank(nn.Module):
    """E experts, each a DiT MLP, stored stacked so one batched kernel runs them all.

    w1_EDF, b1_EF, w2_EFD, b2_ED. Two ways in:

    * :meth:`forward_equal` when every expert takes the same number of tokens (training rule of
      expert choice and DiffMoE): one bmm per projection, no host synchronisation.
    * :meth:`forward_grouped` when counts differ (token choice, dynamic inference): rows sorted by
      expert with ``counts_E``, run by ``grouped_mm``, a padded bmm or a per-expert loop.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, dispatch: str = "auto"):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.dispatch = dispatch
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1_EF = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2_ED = nn.Parameter(torch.zeros(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier-uniform per expert, as DiT initialises every nn.Linear.
        bound = math.sqrt(6.0 / (self.dim + self.hidden))
        nn.init.uniform_(self.w1_EDF, -bound, bound)
        nn.init.uniform_(self.w2_EFD, -bound, bound)
        nn.init.zeros_(self.b1_EF)
        nn.init.zeros_(self.b2_ED)

    def expert_params(self) -> int:
        """Parameters of one expert."""
        return 2 * self.dim * self.hidden + self.hidden + self.dim

    def forward_equal(self, x_EkD: Tensor) -> Tensor:
        h_EkF = gelu_tanh(torch.baddbmm(self.b1_EF.unsqueeze(1).to(x_EkD.dtype), x_EkD,
                                        self.w1_EDF.to(x_EkD.dtype)))
        return torch.baddbmm(self.b2_ED.unsqueeze(1).to(x_EkD.dtype), h_EkF,
                             self.w2_EFD.to(x_EkD.dtype))

    def resolve_dispatch(self, x_TD: Tensor) -> str:
        if self.dispatch != "auto":
            return self.dispatch
        # CPU kernels take float32 and bfloat16; CUDA kernels take bfloat16 (SM >= 80).
        dtypes = (torch.float32, torch.bfloat16) if x_TD.device.type == "cpu" else (torch.bfloat16,)
        if x_TD.dtype in dtypes and grouped_mm_supported(x_TD, self.w1_EDF, self.w2_EFD):
            return "grouped_mm"
        return "padded_bmm"

    def forward_grouped(self, x_TD: Tensor, counts_E: Tensor, kernel: Optional[str] = None,
                        expert_T: Optional[Tensor] = None) -> Tensor:
        """Run rows ``x_TD``, sorted by expert with ``counts_E`` rows each, through their
        experts. ``expert_T`` (each row's expert) is derived from the counts if not given."""
        kernel = kernel or self.resolve_dispatch(x_TD)
        if x_TD.shape[0] == 0:
            return x_TD.new_zeros(0, self.dim)
        if expert_T is None:
            expert_T = self.row_experts(counts_E, x_TD.shape[0])
        if kernel == "grouped_mm":
            return self._grouped_mm(x_TD, counts_E, expert_T)
        if kernel == "padded_bmm":
            return self._padded_bmm(x_TD, counts_E, expert_T)
        if kernel == "loop":
            return self._loop(x_TD, counts_E)
        raise ValueError(f"unknown expert dispatch '{kernel}'")

    def row_experts(self, counts_E: Tensor, rows: int) -> Tensor:
        experts = torch.arange(self.num_experts, device=counts_E.device)
        return torch.repeat_interleave(experts, counts_E, output_size=rows)

    def _grouped_mm(self, x_TD: Tensor, counts_E: Tensor, expert_T: Tensor) -> Tensor:
        dtype = x_TD.dtype
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        h_TF = F.grouped_mm(x_TD, self.w1_EDF.to(dtype), offs=offs_E)
        h_TF = gelu_tanh(h_TF + self.b1_EF.to(dtype)[expert_T])
        y_TD = F.grouped_mm(h_TF, self.w2_EFD.to(dtype), offs=offs_E)
        return y_TD + self.b2_ED.to(dtype)[expert_T]

    def _padded_bmm(self, x_TD: Tensor, counts_E: Tensor, expert_T: Tensor) -> Tensor:
        # Scatter rows into an (E, max_count, D) buffer, one bmm per projection, gather back.
        rows = x_TD.shape[0]
        width = int(counts_E.max())  # the one host synchronisation of this kernel
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        slot_T = expert_T * width + (torch.arange(rows, device=x_TD.device) - starts_E[expert_T])
        buf = x_TD.new_zeros(self.num_experts * width, self.dim).index_copy(0, slot_T, x_TD)
        y = self.forward_equal(buf.view(self.num_experts, width, self.dim))
        return y.reshape(-1, self.dim).index_select(0, slot_T)

    def _loop(self, x_TD: Tensor, counts_E: Tensor) -> Tensor:
        # Plain reference: one matmul pair per expert. Fine for inference; in training its
        # backward accumulates into the whole stacked weight once per expert.
        dtype = x_TD.dtype
        outs = []
        for e, x_e in enumerate(torch.split(x_TD, counts_E.tolist())):
            h = gelu_tanh(x_e @ self.w1_EDF[e].to(dtype) + self.b1_EF[e].to(dtype))
            outs.append(h @ self.w2_EFD[e].to(dtype) + self.b2_ED[e].to(dtype))
        return torch.cat(outs, 0)


class Router(nn.Module):
    """Router logits = pool · W_rᵀ with W_r ∈ R^{E×D}, no bias, init N(0, std²) (Eq. 5);
    scores = softmax over the expert axis (Eq. 6). Computed in at least float32 so that top-k
    selections do not depend on the autocast dtype."""

    def __init__(self, dim: int, num_experts: int, init_std: float):
        super().__init__()
        self.init_std = init_std
        self.weight_ED = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight_ED, std=self.init_std)

    def forward(self, x_SD: Tensor) -> Tensor:
        dtype = torch.promote_types(x_SD.dtype, torch.float32)
        with torch.autocast(device_type=x_SD.device.type, enabled=False):
            logits_SE = F.linear(x_SD.to(dtype), self.weight_ED.to(dtype))
            return logits_SE.softmax(dim=-1)


def combine(y_rows_D: Tensor, token_rows: Tensor, weight_rows: Tensor, num_tokens: int) -> Tensor:
    """Eq. 7: y_s = Σ_e score[s, e] · FFN_e(x_s) over the experts that chose s; tokens chosen by
    no expert get zero."""
    weighted = y_rows_D * weight_rows.unsqueeze(-1).to(y_rows_D.dtype)
    out = y_rows_D.new_zeros(num_tokens, y_rows_D.shape[-1])
    return out.index_add(0, token_rows, weighted)


def selection_mask(token_rows: Tensor, expert_rows: Tensor, num_tokens: int,
                   num_experts: int) -> Tensor:
    """O ∈ {0,1}^{S×E}: True where expert e processed token s (Eq. 13)."""
    mask = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=token_rows.device)
    mask[token_rows, expert_rows] = True
    return mask


class MoELayer(nn.Module):
    """Common parts of the routed layers: router, expert bank, optional shared experts.

    Subclasses implement :meth:`route_and_compute`, returning an :class:`FFNOutput`.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, capacity: float,
                 granularity: int = 1, shared_experts: int = 0, router_init_std: float = 0.006,
                 dispatch: str = "auto"):
        super().__init__()
        self.dim = dim
        self.base_experts = num_experts
        self.granularity = granularity
        self.num_experts = num_experts * granularity  # experts in this layer
        self.capacity = capacity
        self.expert_hidden = hidden // granularity
        self.router = Router(dim, self.num_experts, router_init_std)
        self.experts = ExpertBank(self.num_experts, dim, self.expert_hidden, dispatch)
        self.shared = (FeedForward(dim, shared_experts * self.expert_hidden)
                       if shared_experts > 0 else None)

    def forward(self, x_BsD: Tensor, routing: Routing = STATIC) -> FFNOutput:
        B, s, D = x_BsD.shape
        x_SD = x_BsD.reshape(B * s, D)
        out = self.route_and_compute(x_SD, B, routing)
        y_SD = out.y
        if self.shared is not None:
            y_SD = y_SD + self.shared(x_SD)
        out.y = y_SD.reshape(B, s, D).to(x_BsD.dtype)
        out.num_tokens = B * s
        out.base_experts = self.base_experts
        return out

    def route_and_compute(self, x_SD: Tensor, batch: int, routing: Routing) -> FFNOutput:
        raise NotImplementedError

    def run_equal(self, x_SD: Tensor, idx_Ek: Tensor, w_Ek: Tensor) -> tuple[Tensor, Tensor]:
        """Experts with equal capacity k: gather → batched matmul → weighted index_add.
        ``idx_Ek`` are the chosen token indices, ``w_Ek`` their router scores.
        Returns (y_SD, mask_SE)."""
        E, k = idx_Ek.shape
        S = x_SD.shape[0]
        tok_T = idx_Ek.reshape(-1)
        x_EkD = x_SD.index_select(0, tok_T).view(E, k, self.dim)
        y_EkD = self.experts.forward_equal(x_EkD)
        y_SD = combine(y_EkD.reshape(E * k, self.dim), tok_T, w_Ek.reshape(-1), S)
        expert_T = torch.arange(E, device=x_SD.device).repeat_interleave(k)
        return y_SD, selection_mask(tok_T, expert_T, S, E)

    def run_grouped(self, x_SD: Tensor, tok_T: Tensor, w_T: Tensor,
                    counts_E: Tensor) -> tuple[Tensor, Tensor]:
        """Experts with unequal counts: rows ``tok_T`` already grouped by expert (``counts_E``
        rows each) with router weights ``w_T``. Returns (y_SD, mask_SE)."""
        S = x_SD.shape[0]
        expert_T = self.experts.row_experts(counts_E, tok_T.shape[0])
        y_TD = self.experts.forward_grouped(x_SD.index_select(0, tok_T), counts_E,
                                            expert_T=expert_T)
        y_SD = combine(y_TD, tok_T, w_T, S)
        return y_SD, selection_mask(tok_T, expert_T, S, self.num_experts)
