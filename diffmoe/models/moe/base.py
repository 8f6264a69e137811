"""What every feed-forward variant shares: its result type, the dense FFN (also the dense
variant, :class:`DenseFFN`), the stacked expert bank with its dispatch kernels, and the router.

Shape suffixes (as in torchtitan): B samples, s tokens per sample, S = B*s tokens in the pool,
D model width, F expert hidden width, E experts in the layer, k tokens per expert (equal
capacities), T routed rows (unequal capacities, rows grouped by expert).

The expert kernel for unequal counts (``model.moe.dispatch: auto``) is chosen by
:meth:`ExpertBank.kernel`: ``grouped_mm`` where torch has its fast kernel, else ``padded_bmm``
(:func:`auto_kernel`, a constant for torch.compile, logged once), and the per-expert ``loop``
for counts already on the host that padding would inflate by more than a quarter.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...config import DISPATCH_KERNELS, ROUTING_MODES
from ..init import InitPlan, apply_plan, prefixed

log = logging.getLogger(__name__)

# CUDA compute capabilities (major versions) on which torch's grouped_mm has its fast kernel:
# torch's _grouped_mm_cuda (aten/src/ATen/native/cuda/GroupedBlas.cpp) runs the CUTLASS grouped
# GEMM only on sm90 or sm100 with bfloat16 operands; elsewhere it copies the offsets to the host
# and runs one matmul per group.
FAST_GROUPED_MM_CAPABILITIES = (9, 10)
# The operand dtype of that fast kernel, and the only one torch.compile's meta kernel for
# grouped_mm accepts (eager CPU kernels also take float32).
GROUPED_MM_DTYPE = torch.bfloat16
# grouped_mm needs every operand's row stride to be a multiple of this many bytes.
GROUPED_MM_ALIGNMENT_BYTES = 16
# ``auto`` runs unequal counts already read to the host (dynamic inference) one expert at a time
# (``loop``) instead of padded when padding to the largest count would add more than this share
# of rows. The loop pays for itself on skewed counts: on 2 shared CPU cores (torch 2.13, fp32,
# forward, 4096 rows, 16 experts; benchmarks/dispatch_kernels.py) with padding adding 2.8x the
# rows it took 0.64x (S-E16) and 0.36x (B-E16) the padded time; with none it took 2.1x / 1.8x;
# in between (0.4-0.9x added) the two were within the measurement's noise of each other.
PADDED_BMM_MAX_WASTE = 0.25


@dataclass(frozen=True)
class Routing:
    """How MoE layers route at inference (paper §4). Ignored in training mode, which always
    uses the training rule.

    * ``static``: the training rule (top-k with k = S*C/E for expert choice).
    * ``dynamic``: expert e takes k_e = #{p[:, e] > tau_e} tokens (Eq. 14), picked by the router.
    * ``threshold``: as dynamic with one constant threshold gamma for all experts (Eq. 16).
    * ``predictor``: token s goes to expert e iff p[s, e] > tau_e: the predictor chooses the
      tokens, not only how many, so no token's routing depends on the rest of the batch (beyond
      the paper).
    """

    mode: str = "static"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"routing mode '{self.mode}' is not one of {ROUTING_MODES}")


STATIC = Routing("static")


@dataclass(frozen=True)
class FFNOutput:
    """Everything a feed-forward layer produced, returned explicitly and never changed after.

    y: the layer output (B, s, D). The other fields are None for a dense layer.
    aux_loss: token-choice load-balance loss (unweighted), a scalar.
    predictor_loss: capacity-predictor BCE (Eq. 12) for this layer, a scalar (training only).
    predictor_logits_SE: capacity-predictor logits (DiffMoE, except static inference).
    counts_E: tokens processed per expert, k_e.
    tokens_T: the token of each processed row, rows grouped by expert (``counts_E`` rows each).
    threshold_targets_E: q_e of Eq. 17 over the training pool (DiffMoE in training mode). The
        forward only records them; ``apply_threshold_updates`` moves the thresholds.
    num_tokens: S, the pool the counts refer to.
    base_experts: E before fine-graining, the E of the capacity formula (Eq. 8).
    """

    y: Tensor
    aux_loss: Optional[Tensor] = None
    predictor_loss: Optional[Tensor] = None
    predictor_logits_SE: Optional[Tensor] = None
    counts_E: Optional[Tensor] = None
    tokens_T: Optional[Tensor] = None
    threshold_targets_E: Optional[Tensor] = None
    num_tokens: int = 0
    base_experts: int = 1

    def selection_mask(self) -> Optional[Tensor]:
        """O (Eq. 13), (S, E): True where expert e processed token s; None for a dense layer."""
        if self.tokens_T is None:
            return None
        return selection_mask(self.tokens_T, self.counts_E, self.num_tokens)


@dataclass(frozen=True)
class Choice:
    """Which tokens each expert processes, and with which weights (Eq. 7).

    Equal capacities (the training rule of expert choice and DiffMoE, static inference):
    ``tokens`` and ``weights`` are (E, k), run as one batched matmul without a host
    synchronisation. Otherwise rows grouped by expert: ``tokens``/``weights`` (T,) with
    ``counts_E`` rows each, ``host_counts`` the same counts if already read to the host."""

    tokens: Tensor
    weights: Tensor
    counts_E: Tensor
    host_counts: Optional[list[int]] = None

    @property
    def equal(self) -> bool:
        return self.tokens.dim() == 2

    @classmethod
    def top_k(cls, idx_Ek: Tensor, w_Ek: Tensor) -> "Choice":
        """Every expert takes k tokens: ``idx_Ek`` the chosen tokens, ``w_Ek`` their scores."""
        E, k = idx_Ek.shape
        return cls(idx_Ek, w_Ek, torch.full((E,), k, dtype=torch.long, device=idx_Ek.device))


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


class DenseFFN(FeedForward):
    """The ordinary DiT feed-forward layer, behind the same interface as the routed ones."""

    def forward(self, x_BsD: Tensor, routing: Routing = STATIC) -> FFNOutput:  # type: ignore[override]
        return FFNOutput(y=super().forward(x_BsD), num_tokens=x_BsD.shape[0] * x_BsD.shape[1])


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts compute ``x``'s rows in: autocast's for float32 rows on a device
    under autocast, else the rows' own."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def has_fast_grouped_mm(device: torch.device) -> bool:
    """Whether torch's grouped_mm runs its fast kernel on ``device`` (see
    :data:`FAST_GROUPED_MM_CAPABILITIES`)."""
    if device.type != "cuda" or not hasattr(F, "grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device)[0] in FAST_GROUPED_MM_CAPABILITIES


_KERNEL_CHOICES: dict[tuple, str] = {}


@torch.compiler.assume_constant_result
def auto_kernel(device: torch.device, dtype: torch.dtype, widths: tuple[int, ...]) -> str:
    """The expert kernel of ``dispatch: auto`` for rows computed in ``dtype`` on ``device``
    through experts of these widths (D, F): ``grouped_mm`` where it has its fast kernel (bfloat16,
    CUDA compute capability 9.x or 10.x, row strides aligned for bfloat16), else ``padded_bmm``,
    one batched matmul per projection over rows padded to the largest count (one kernel, where
    grouped_mm would copy the offsets to the host and run one matmul per expert). A constant for
    torch.compile, so compiled and eager code choose alike; each choice is logged once."""
    key = (device, dtype, widths)
    if key not in _KERNEL_CHOICES:
        if dtype != GROUPED_MM_DTYPE:
            kernel, why = "padded_bmm", f"grouped_mm's fast kernel takes bfloat16 rows, not {dtype}"
        elif not has_fast_grouped_mm(device):
            kernel, why = "padded_bmm", (f"{device} has no fast grouped_mm kernel (CUDA compute "
                                         f"capability 9.x or 10.x)")
        elif any(w * dtype.itemsize % GROUPED_MM_ALIGNMENT_BYTES for w in widths):
            kernel, why = "padded_bmm", (f"widths {widths} in {dtype} are not multiples of "
                                         f"{GROUPED_MM_ALIGNMENT_BYTES} bytes")
        else:
            kernel, why = "grouped_mm", f"bfloat16 rows on {device}"
        _KERNEL_CHOICES[key] = kernel
        log.info("MoE expert kernel for %s rows on %s: %s (%s)", dtype, device, kernel, why)
    return _KERNEL_CHOICES[key]


def row_experts(counts_E: Tensor, experts: int, rows: int) -> Tensor:
    """The expert of each of ``rows`` rows grouped by expert with ``counts_E`` rows each (no host
    synchronisation: the total is given)."""
    return torch.repeat_interleave(torch.arange(experts, device=counts_E.device), counts_E,
                                   output_size=rows)


class ExpertBank(nn.Module):
    """E experts, each a DiT MLP, stored stacked so one batched kernel runs them all.

    w1_EDF, b1_EF, w2_EFD, b2_ED. Two ways in:

    * :meth:`forward_equal` when every expert takes the same number of tokens (training rule of
      expert choice and DiffMoE), or when unequal counts are padded to the largest
      (``padded_bmm``, :meth:`MoELayer.run_grouped`): one bmm per projection.
    * :meth:`forward_grouped` for rows sorted by expert with unequal counts (token choice,
      dynamic inference): ``grouped_mm`` or a per-expert loop.

    :meth:`kernel` says which of the three (``dispatch``; ``auto`` is :func:`auto_kernel`).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, dispatch: str = "auto"):
        super().__init__()
        if dispatch not in DISPATCH_KERNELS:
            raise ValueError(f"unknown expert dispatch '{dispatch}'; use one of {DISPATCH_KERNELS}")
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.dispatch = dispatch
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1_EF = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2_ED = nn.Parameter(torch.zeros(num_experts, dim))
        # (dtype, the parameters' versions, their casts) while :func:`cast_experts_once` holds.
        self._held: Optional[tuple[torch.dtype, tuple[int, ...], tuple[Tensor, ...]]] = None
        self.reset_parameters()

    def init_plan(self) -> InitPlan:
        """Xavier-uniform per expert, as DiT initialises every nn.Linear; zero biases."""
        bound = math.sqrt(6.0 / (self.dim + self.hidden))
        xavier = functools.partial(nn.init.uniform_, a=-bound, b=bound)
        return [("w1_EDF", xavier), ("w2_EFD", xavier), ("b1_EF", nn.init.zeros_),
                ("b2_ED", nn.init.zeros_)]

    def reset_parameters(self) -> None:
        apply_plan(self, self.init_plan())

    def expert_params(self) -> int:
        """Parameters of one expert."""
        return 2 * self.dim * self.hidden + self.hidden + self.dim

    def parameters_in_order(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """w1_EDF, b1_EF, w2_EFD, b2_ED."""
        return self.w1_EDF, self.b1_EF, self.w2_EFD, self.b2_ED

    def weights(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """w1_EDF, b1_EF, w2_EFD, b2_ED in the rows' compute dtype: the casts
        :func:`cast_experts_once` holds where they are of these weights, as they are now, in that
        dtype, and no gradient is being recorded; else cast here (always in compiled code, whose
        graphs would break on the weights' version counters)."""
        params = self.parameters_in_order()
        held = self._held
        if held is not None and not torch.compiler.is_compiling() and held[0] == dtype and \
                not torch.is_grad_enabled() and held[1] == tuple(p._version for p in params):
            return held[2]
        return tuple(p.to(dtype) for p in params)

    def forward_equal(self, x_EkD: Tensor) -> Tensor:
        w1, b1, w2, b2 = self.weights(x_EkD.dtype)
        h_EkF = gelu_tanh(torch.baddbmm(b1.unsqueeze(1), x_EkD, w1))
        return torch.baddbmm(b2.unsqueeze(1), h_EkF, w2)

    def kernel(self, device: torch.device, dtype: torch.dtype,
               host_counts: Optional[Sequence[int]] = None) -> str:
        """The kernel for unequal counts, for rows computed in ``dtype`` on ``device``. With
        ``auto`` and the counts on the host, ``padded_bmm`` gives way to the per-expert loop
        where padding to the largest count would add more than :data:`PADDED_BMM_MAX_WASTE` of
        the rows (the loop then needs no further host read)."""
        if self.dispatch != "auto":
            return self.dispatch
        kernel = auto_kernel(device, dtype, (self.dim, self.hidden))
        if kernel == "padded_bmm" and host_counts and \
                len(host_counts) * max(host_counts) > (1 + PADDED_BMM_MAX_WASTE) * sum(host_counts):
            return "loop"
        return kernel

    def forward_grouped(self, x_TD: Tensor, counts_E: Tensor, kernel: str,
                        host_counts: Optional[list[int]] = None) -> Tensor:
        """Run rows ``x_TD``, sorted by expert with ``counts_E`` rows each, through their
        experts with ``kernel`` (``grouped_mm`` or ``loop``). ``host_counts``: ``counts_E`` as
        Python ints if the caller has read them; the loop reads them otherwise (the one host
        synchronisation of this path), grouped_mm needs none."""
        if x_TD.shape[0] == 0:
            return x_TD.new_zeros(0, self.dim)
        if kernel == "loop":
            return self._loop(x_TD, counts_E.tolist() if host_counts is None else host_counts)
        return self._grouped_mm(x_TD, counts_E, row_experts(counts_E, self.num_experts,
                                                            x_TD.shape[0]))

    def _grouped_mm(self, x_TD: Tensor, counts_E: Tensor, expert_T: Tensor) -> Tensor:
        w1, b1, w2, b2 = self.weights(x_TD.dtype)
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        h_TF = gelu_tanh(F.grouped_mm(x_TD, w1, offs=offs_E) + b1[expert_T])
        return F.grouped_mm(h_TF, w2, offs=offs_E) + b2[expert_T]

    def _loop(self, x_TD: Tensor, counts: list[int]) -> Tensor:
        # One expert at a time, its hidden rows used while they are in cache (bias fused). The
        # weights are unbound once, so the backward stacks the E slices' gradients in one op.
        w1, b1, w2, b2 = (p.unbind(0) for p in self.weights(x_TD.dtype))
        return torch.cat([torch.addmm(b2[e], gelu_tanh(torch.addmm(b1[e], x_e, w1[e])), w2[e])
                          for e, x_e in enumerate(x_TD.split(counts))])


@contextlib.contextmanager
def cast_experts_once(model: nn.Module, dtype: Optional[torch.dtype]) -> Iterator[None]:
    """For inference under autocast (sampling, ``precision: bf16``): every :class:`ExpertBank` of
    ``model`` casts its weights to ``dtype`` once, on entry, instead of at every forward, and drops
    the casts on exit. autocast already keeps an ``nn.Linear``'s cast for its whole region, but
    the experts cast their stacked weights themselves, E times a dense layer's bytes at every
    sampling step. The held casts are the same values, so outputs are unchanged; they serve
    only forwards without gradient, and a weight changed meanwhile is cast anew. ``dtype`` None
    or float32, or parameters sharded as DTensors (FSDP2 unshards them per forward): nothing is
    held."""
    banks = [m for m in model.modules() if isinstance(m, ExpertBank)] \
        if dtype not in (None, torch.float32) else []
    banks = [b for b in banks if all(type(p.data) is torch.Tensor and p.dtype != dtype
                                     for p in b.parameters_in_order())]
    with torch.no_grad():
        for bank in banks:
            params = bank.parameters_in_order()
            bank._held = (dtype, tuple(p._version for p in params),
                          tuple(p.detach().to(dtype) for p in params))
    try:
        yield
    finally:
        for bank in banks:
            bank._held = None


class Router(nn.Module):
    """Router logits = pool · W_rᵀ with W_r ∈ R^{E×D}, no bias, init N(0, std²) (Eq. 5);
    scores = softmax over the expert axis (Eq. 6). Computed in at least float32 so that top-k
    selections do not depend on the autocast dtype."""

    def __init__(self, dim: int, num_experts: int, init_std: float):
        super().__init__()
        self.init_std = init_std
        self.weight_ED = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    def init_plan(self) -> InitPlan:
        return [("weight_ED", functools.partial(nn.init.normal_, std=self.init_std))]

    def reset_parameters(self) -> None:
        apply_plan(self, self.init_plan())

    def forward(self, x_SD: Tensor) -> Tensor:
        dtype = torch.promote_types(x_SD.dtype, torch.float32)
        with torch.autocast(device_type=x_SD.device.type, enabled=False):
            logits_SE = F.linear(x_SD.to(dtype), self.weight_ED.to(dtype))
            return logits_SE.softmax(dim=-1)


def gather_rows(x_SD: Tensor, tok_T: Tensor) -> Tensor:
    """The rows ``tok_T`` of the pool for the experts, cast once to their compute dtype (before
    the gather, so under autocast the gather moves half the bytes)."""
    return x_SD.to(compute_dtype(x_SD)).index_select(0, tok_T)


def padded(tok_T: Tensor, w_T: Tensor, counts_E: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Rows grouped by expert (``counts_E`` each) as (E, width) token and weight tables, each
    expert's rows padded to ``width`` with token 0 at weight 0, which adds exactly nothing."""
    experts = counts_E.shape[0]
    rows = tok_T.shape[0]
    expert_T = row_experts(counts_E, experts, rows)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    slot_T = expert_T * width + (torch.arange(rows, device=tok_T.device) - starts_E[expert_T])
    tok_Ew = tok_T.new_zeros(experts * width).index_copy_(0, slot_T, tok_T)
    w_Ew = w_T.new_zeros(experts * width).index_copy_(0, slot_T, w_T)
    return tok_Ew.view(experts, width), w_Ew.view(experts, width)


def combine(y_rows_D: Tensor, token_rows: Tensor, weight_rows: Tensor, num_tokens: int) -> Tensor:
    """Eq. 7: y_s = Σ_e score[s, e] · FFN_e(x_s) over the experts that chose s; tokens chosen by
    no expert get zero."""
    weighted = y_rows_D * weight_rows.unsqueeze(-1).to(y_rows_D.dtype)
    return y_rows_D.new_zeros(num_tokens, y_rows_D.shape[-1]).index_add_(0, token_rows, weighted)


def selection_mask(tok_T: Tensor, counts_E: Tensor, num_tokens: int) -> Tensor:
    """O ∈ {0,1}^{S×E}: True where expert e processed token s (Eq. 13), from the tokens of rows
    grouped by expert (``counts_E`` rows each)."""
    experts = counts_E.shape[0]
    mask = torch.zeros(num_tokens, experts, dtype=torch.bool, device=tok_T.device)
    mask[tok_T, row_experts(counts_E, experts, tok_T.shape[0])] = True
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

    def init_plan(self) -> InitPlan:
        """The router's and the experts' own initialisation (their Linears, the shared experts'
        and a predictor's, are the model's: DiT's Xavier-uniform)."""
        return prefixed("router", self.router.init_plan()) + prefixed(
            "experts", self.experts.init_plan())

    def forward(self, x_BsD: Tensor, routing: Routing = STATIC) -> FFNOutput:
        B, s, D = x_BsD.shape
        x_SD = x_BsD.reshape(B * s, D)
        out = self.route_and_compute(x_SD, B, routing)
        y_SD = out.y if self.shared is None else out.y + self.shared(x_SD)
        return replace(out, y=y_SD.reshape(B, s, D).to(x_BsD.dtype))

    def route_and_compute(self, x_SD: Tensor, batch: int, routing: Routing) -> FFNOutput:
        """Route the pool ``x_SD`` (``batch`` samples) and run the experts; the result comes from
        :meth:`output`, its ``y`` still (S, D)."""
        raise NotImplementedError

    def run(self, x_SD: Tensor, choice: Choice) -> Tensor:
        """The experts on the tokens ``choice`` gave them, combined by Eq. 7."""
        if choice.equal:
            return self.run_equal(x_SD, choice.tokens, choice.weights)
        return self.run_grouped(x_SD, choice.tokens, choice.weights, choice.counts_E,
                                choice.host_counts)

    def run_equal(self, x_SD: Tensor, idx_Ek: Tensor, w_Ek: Tensor) -> Tensor:
        """Experts with equal capacity k: gather → batched matmul → weighted index_add.
        ``idx_Ek`` are the chosen token indices, ``w_Ek`` their router scores."""
        E, k = idx_Ek.shape
        tok_T = idx_Ek.reshape(-1)
        x_EkD = gather_rows(x_SD, tok_T).view(E, k, self.dim)
        y_EkD = self.experts.forward_equal(x_EkD)
        return combine(y_EkD.reshape(E * k, self.dim), tok_T, w_Ek.reshape(-1), x_SD.shape[0])

    def run_grouped(self, x_SD: Tensor, tok_T: Tensor, w_T: Tensor, counts_E: Tensor,
                    host_counts: Optional[list[int]] = None) -> Tensor:
        """Experts with unequal counts: rows ``tok_T`` already grouped by expert (``counts_E``
        rows each, ``host_counts`` the same as Python ints if read) with router weights
        ``w_T``. ``padded_bmm`` pads every expert's tokens to the largest count (padding: token
        0 with weight 0) and runs them as equal capacities; it reads the largest count unless
        ``host_counts`` are given (the one host synchronisation of this path)."""
        kernel = self.experts.kernel(x_SD.device, compute_dtype(x_SD), host_counts)
        if kernel == "padded_bmm":
            width = int(counts_E.max()) if host_counts is None else max(host_counts)
            return self.run_equal(x_SD, *padded(tok_T, w_T, counts_E, width))
        y_TD = self.experts.forward_grouped(gather_rows(x_SD, tok_T), counts_E, kernel,
                                            host_counts)
        return combine(y_TD, tok_T, w_T, x_SD.shape[0])

    def output(self, y_SD: Tensor, choice: Choice, **fields) -> FFNOutput:
        """The layer's :class:`FFNOutput` for the tokens ``choice`` gave the experts."""
        return FFNOutput(y=y_SD, counts_E=choice.counts_E, tokens_T=choice.tokens.reshape(-1),
                         num_tokens=y_SD.shape[0], base_experts=self.base_experts, **fields)
