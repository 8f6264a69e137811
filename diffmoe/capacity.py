"""Capacity accounting (paper §5): how much expert compute a forward pass spent.

* Eq. 8, per expert: C_e = E · k_e / S — 1.0 means the expert processed its fair share of the
  pool. E is the layer's expert count before fine-graining (``base_experts``), so a fine-grained
  expert at its fair share also has C_e = 1.
* Eq. 9, per forward: C = mean over MoE layers and their experts of C_e.
* Eq. 15, over sampling: C_avg_infer = mean over the sampling forwards of C.
* Eq. 40, activated parameters ≈ (1 + C_avg)/(1 + E)·#FFN + #rest for the interleaved model; in
  general: every non-routed parameter plus C_avg × (one full expert's parameters) per MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .models.dit import DiT, DiTOutput
from .models.moe import FFNOutput
from .models.moe.diffmoe import CapacityPredictor


def expert_capacities(counts_E: Tensor, num_tokens: int, base_experts: int) -> Tensor:
    """Eq. 8: C_e = E · k_e / S for each expert of one layer."""
    return counts_E.float() * base_experts / num_tokens


def forward_capacity(layers: list[FFNOutput]) -> Tensor:
    """Eq. 9: C = (1 / (L·E)) Σ_layers Σ_experts C_e, as a 0-dim tensor (no host sync).
    Returns 1 for a model without routed layers (dense compute)."""
    routed = [o for o in layers if o.counts_E is not None]
    if not routed:
        return torch.ones(())
    return torch.stack([expert_capacities(o.counts_E, o.num_tokens, o.base_experts).mean()
                        for o in routed]).mean()


def sample_capacities(out: FFNOutput, rows: int) -> Tensor:
    """Eq. 8-9 restricted to each sample's tokens: for each of the ``rows`` samples in the pool,
    the mean over this layer's experts of E·(tokens of the sample the expert took)/(tokens of the
    sample), i.e. how many experts (in units of one full expert) a token of that sample used."""
    mask = out.selection_mask()
    experts = mask.shape[1]
    tokens = out.num_tokens // rows
    per_row = mask.view(rows, tokens, experts).sum((1, 2)).float()
    return per_row * out.base_experts / (experts * tokens)


@dataclass
class CapacityMeter:
    """Records C (Eq. 9) per MoE layer for every model forward during sampling; C_avg_infer
    (Eq. 15) is their mean. Use ``meter.on_forward`` as the sampler's callback.

    Recording synchronises nothing: a forward's records stay on the model's device until they are
    read (``per_layer``, ``per_expert``, ``per_sample``, :meth:`c_avg`, :meth:`summary`) or
    :meth:`end_batch` is called, and then all waiting records come to the host in one copy."""

    # Optional finer records (for ``diffmoe analyze``): per expert (L lists of (E,)) and per
    # sample of the forward's batch ((rows,), mean over layers; needs the selection masks).
    track_experts: bool = False
    track_samples: bool = False
    # The flow-axis time of each routed forward.
    times: list[float] = field(default_factory=list)
    # Every model call seen, routed or not (the samplers' number of function evaluations).
    calls: int = 0
    # Records on the host: per routed forward, C of each layer ((L,)) and the optional ones.
    _per_layer: list[Tensor] = field(default_factory=list, repr=False)
    _per_expert: list[list[Tensor]] = field(default_factory=list, repr=False)
    _per_sample: list[Tensor] = field(default_factory=list, repr=False)
    # Records of forwards not yet copied to the host, each a list of device tensors in the order
    # per layer, per expert (if tracked), per sample (if tracked).
    _waiting: list[list[Tensor]] = field(default_factory=list, repr=False)

    def on_forward(self, t: float, out: DiTOutput) -> None:
        self.calls += 1
        routed = [o for o in out.layers if o.counts_E is not None]
        if not routed:
            return
        per_expert = [expert_capacities(o.counts_E, o.num_tokens, o.base_experts).detach()
                      for o in routed]
        self.times.append(float(t))
        record = [torch.stack([c.mean() for c in per_expert])]
        if self.track_experts:
            record += per_expert
        if self.track_samples:
            rows = out.prediction.shape[0]
            record.append(torch.stack([sample_capacities(o, rows) for o in routed]).mean(0)
                          .detach())
        self._waiting.append(record)

    def end_batch(self) -> None:
        """Copy the waiting records to the host (one copy for all of them)."""
        if not self._waiting:
            return
        flat = torch.cat([r.float().reshape(-1) for rec in self._waiting for r in rec]).cpu()
        parts = iter(flat.split([r.numel() for rec in self._waiting for r in rec]))
        for rec in self._waiting:
            host = [next(parts).view(r.shape) for r in rec]
            self._per_layer.append(host[0])
            if self.track_experts:
                self._per_expert.append(host[1:1 + len(rec[0])])
            if self.track_samples:
                self._per_sample.append(host[-1])
        self._waiting.clear()

    @property
    def per_layer(self) -> list[Tensor]:
        """C of each MoE layer, (L,), per routed forward."""
        self.end_batch()
        return self._per_layer

    @property
    def per_expert(self) -> list[list[Tensor]]:
        """C_e of each expert, L tensors (E,), per routed forward (``track_experts``)."""
        self.end_batch()
        return self._per_expert

    @property
    def per_sample(self) -> list[Tensor]:
        """Each sample's capacity, (rows,), per routed forward (``track_samples``)."""
        self.end_batch()
        return self._per_sample

    @property
    def num_forwards(self) -> int:
        return len(self.times)

    def c_avg(self) -> float:
        """Eq. 15: mean over recorded forwards of C (1.0 when nothing was routed)."""
        if not self.per_layer:
            return 1.0
        return float(torch.stack(self.per_layer).mean())

    def extend(self, other: "CapacityMeter") -> None:
        """Append ``other``'s records (on the host) after this meter's (a batch sampled
        elsewhere)."""
        self.end_batch()
        self.times += other.times
        self._per_layer += other.per_layer
        self._per_expert += other.per_expert
        self._per_sample += other.per_sample
        self.calls += other.calls

    def summary(self) -> dict:
        if not self.per_layer:
            return {"c_avg_infer": 1.0, "per_layer": [], "per_timestep": []}
        stacked = torch.stack(self.per_layer)  # (forwards, L)
        by_t: dict[float, list[float]] = {}
        for t, c in zip(self.times, stacked.mean(1).tolist()):
            by_t.setdefault(round(t, 6), []).append(c)
        return {
            "c_avg_infer": float(stacked.mean()),
            "per_layer": stacked.mean(0).tolist(),
            "per_timestep": [{"t": t, "capacity": sum(v) / len(v)}
                             for t, v in sorted(by_t.items())],
        }


def activated_params(model: DiT, c_avg: float = 1.0, include_predictor: bool = False) -> float:
    """Eq. 40: parameters a token activates at average capacity ``c_avg``.

    Every parameter that is not a routed expert counts fully (attention, adaLN, embeddings, dense
    FFNs, routers, shared experts); each MoE layer adds ``c_avg`` full experts (g fine-grained
    experts make one full expert). The capacity predictor is left out by default, as in the paper's
    table (paper §1).
    """
    total = float(model.num_params())
    for layer in model.moe_layers():
        bank = layer.experts
        total -= bank.num_experts * bank.expert_params()
        total += c_avg * layer.granularity * bank.expert_params()
        predictor = getattr(layer, "predictor", None)
        if isinstance(predictor, CapacityPredictor) and not include_predictor:
            total -= sum(p.numel() for p in predictor.parameters())
    return total
