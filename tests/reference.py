"""Plain, slow reference implementations of the routing rules (paper §2), written as
directly from the text as possible: Python loops over experts and tokens, one FFN call per
(expert, token). The fast layers are tested against these, values and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffmoe.models.moe import MoELayer


def expert_ffn(layer: MoELayer, e: int, x_D: torch.Tensor) -> torch.Tensor:
    bank = layer.experts
    h = F.gelu(x_D @ bank.w1_EDF[e] + bank.b1_EF[e], approximate="tanh")
    return h @ bank.w2_EFD[e] + bank.b2_ED[e]


def router_scores(layer: MoELayer, x_SD: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x_SD @ layer.router.weight_ED.t(), dim=-1)


def combine_choices(layer: MoELayer, x_SD: torch.Tensor, scores_SE: torch.Tensor,
                    chosen: dict[int, list[int]]) -> torch.Tensor:
    """Eq. 7 token by token: y_s = Σ_{e chose s} score[s, e] · FFN_e(x_s)."""
    rows = []
    for s in range(x_SD.shape[0]):
        acc = torch.zeros_like(x_SD[s])
        for e, tokens in chosen.items():
            if s in tokens:
                acc = acc + scores_SE[s, e] * expert_ffn(layer, e, x_SD[s])
        rows.append(acc)
    y = torch.stack(rows)
    if layer.shared is not None:
        y = y + layer.shared(x_SD)
    return y


def reference_diffmoe_train(layer: MoELayer, x_BsD: torch.Tensor, k: int) -> torch.Tensor:
    """Each expert takes its top-k tokens of the flattened batch pool."""
    B, s, D = x_BsD.shape
    x_SD = x_BsD.reshape(B * s, D)
    scores = router_scores(layer, x_SD)
    chosen = {e: torch.topk(scores[:, e], k).indices.tolist() for e in range(layer.num_experts)}
    return combine_choices(layer, x_SD, scores, chosen).view(B, s, D)


def reference_expert_choice(layer: MoELayer, x_BsD: torch.Tensor, k: int) -> torch.Tensor:
    """Each expert takes its top-k tokens within each sample."""
    B, s, D = x_BsD.shape
    x_SD = x_BsD.reshape(B * s, D)
    scores = router_scores(layer, x_SD)
    chosen: dict[int, list[int]] = {e: [] for e in range(layer.num_experts)}
    for b in range(B):
        for e in range(layer.num_experts):
            top = torch.topk(scores[b * s:(b + 1) * s, e], k).indices
            chosen[e] += (top + b * s).tolist()
    return combine_choices(layer, x_SD, scores, chosen).view(B, s, D)


def reference_token_choice(layer: MoELayer, x_BsD: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each token takes its top-K experts by softmax score."""
    B, s, D = x_BsD.shape
    x_SD = x_BsD.reshape(B * s, D)
    scores = router_scores(layer, x_SD)
    chosen: dict[int, list[int]] = {e: [] for e in range(layer.num_experts)}
    for tok in range(B * s):
        for e in torch.topk(scores[tok], top_k).indices.tolist():
            chosen[e].append(tok)
    return combine_choices(layer, x_SD, scores, chosen).view(B, s, D)


def reference_dynamic(layer: MoELayer, x_BsD: torch.Tensor, thresholds: torch.Tensor
                      ) -> tuple[torch.Tensor, list[int]]:
    """Eq. 14: expert e takes k_e = #{p[:, e] > tau_e} tokens, the top-k_e by router score."""
    B, s, D = x_BsD.shape
    x_SD = x_BsD.reshape(B * s, D)
    scores = router_scores(layer, x_SD)
    probs = torch.sigmoid(layer.predictor(x_SD))
    counts, chosen = [], {}
    for e in range(layer.num_experts):
        k_e = int((probs[:, e] > thresholds[e]).sum())
        counts.append(k_e)
        chosen[e] = torch.topk(scores[:, e], k_e).indices.tolist() if k_e else []
    return combine_choices(layer, x_SD, scores, chosen).view(B, s, D), counts


def reference_predictor(layer: MoELayer, x_BsD: torch.Tensor, thresholds: torch.Tensor
                        ) -> torch.Tensor:
    """``predictor`` mode: token s goes to expert e iff p[s, e] > tau_e."""
    B, s, D = x_BsD.shape
    x_SD = x_BsD.reshape(B * s, D)
    probs = torch.sigmoid(layer.predictor(x_SD))
    chosen = {e: [tok for tok in range(B * s) if probs[tok, e] > thresholds[e]]
              for e in range(layer.num_experts)}
    return combine_choices(layer, x_SD, router_scores(layer, x_SD), chosen).view(B, s, D)


def reference_local_dynamic(layer: MoELayer, x_BsD: torch.Tensor, thresholds: torch.Tensor
                            ) -> tuple[torch.Tensor, list[list[int]]]:
    """Eq. 14 within each sample: in sample b expert e takes the top k_{b,e} tokens of b by router
    score, k_{b,e} = #{s in b : p[s, e] > tau_e}. Returns the output and the counts k_{b,e}."""
    B, s, D = x_BsD.shape
    x_SD = x_BsD.reshape(B * s, D)
    scores = router_scores(layer, x_SD)
    probs = torch.sigmoid(layer.predictor(x_SD))
    chosen: dict[int, list[int]] = {e: [] for e in range(layer.num_experts)}
    counts = []
    for b in range(B):
        counts.append([])
        for e in range(layer.num_experts):
            k = int((probs[b * s:(b + 1) * s, e] > thresholds[e]).sum())
            counts[b].append(k)
            chosen[e] += (torch.topk(scores[b * s:(b + 1) * s, e], k).indices + b * s).tolist()
    return combine_choices(layer, x_SD, scores, chosen).view(B, s, D), counts
