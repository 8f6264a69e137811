"""Capacity accounting (Eq. 8, 9, 15, 40) on hand-built cases."""

from __future__ import annotations

import pytest
import torch

from diffmoe.capacity import CapacityMeter, activated_params, expert_capacities, forward_capacity
from diffmoe.config import ModelConfig, MoEConfig
from diffmoe.models import build_model
from diffmoe.models.dit import DiTOutput
from diffmoe.models.moe import FFNOutput


def ffn(counts, tokens, experts):
    return FFNOutput(y=torch.zeros(1), counts_E=torch.tensor(counts), num_tokens=tokens,
                     base_experts=experts)


def test_eq8_per_expert():
    # 16 experts, pool of 1024 tokens: an expert with 64 tokens has C_e = 1 (the seed's example).
    c = expert_capacities(torch.tensor([64, 128, 0, 32]), 1024, 16)
    assert c.tolist() == [1.0, 2.0, 0.0, 0.5]


def test_eq9_per_forward():
    layers = [ffn([4, 4], 8, 2), ffn([8, 0], 8, 2), ffn([2, 2], 8, 2), FFNOutput(y=torch.zeros(1))]
    # layer means: 1.0, 1.0, 0.5 -> C = 2.5 / 3
    assert forward_capacity(layers).item() == pytest.approx(2.5 / 3)
    assert forward_capacity([FFNOutput(y=torch.zeros(1))]).item() == 1.0


def test_eq15_average_over_steps():
    meter = CapacityMeter()
    for t, counts in [(0.0, [8, 8]), (0.5, [4, 4]), (0.5, [2, 2])]:
        meter.on_forward(t, DiTOutput(prediction=torch.zeros(1),
                                      layers=[ffn(counts, 8, 2), ffn(counts, 8, 2)]))
    # C per forward: 2.0, 1.0, 0.5
    assert meter.c_avg() == pytest.approx(3.5 / 3)
    summary = meter.summary()
    assert summary["per_timestep"] == [{"t": 0.0, "capacity": 2.0}, {"t": 0.5, "capacity": 0.75}]
    assert summary["per_layer"] == pytest.approx([3.5 / 3, 3.5 / 3])


def small(moe: MoEConfig) -> ModelConfig:
    return ModelConfig(input_size=4, in_channels=1, patch_size=2, depth=4, hidden_size=8,
                       num_heads=2, num_classes=2, moe=moe)


def test_eq40_activated_parameters_by_hand():
    E = 4
    model = build_model(small(MoEConfig(type="diffmoe", num_experts=E)))
    D, F = 8, 32
    expert = 2 * D * F + F + D
    total = model.num_params()
    pred = 2 * (D * D + D + D * E + E)
    routed = 2 * E * expert  # two MoE layers (interleave)
    rest = total - routed - pred
    for c in (0.0, 0.5, 1.0, 2.0):
        assert activated_params(model, c) == pytest.approx(rest + 2 * c * expert)
    # The paper's form for the interleaved model: (1 + C)/(1 + E) * #FFN + #other,
    # with #FFN counting the two dense and the two MoE layers' experts.
    ffn_all = 2 * expert + routed
    other = total - ffn_all - pred
    for c in (0.5, 1.0):
        assert activated_params(model, c) == pytest.approx((1 + c) / (1 + E) * ffn_all + other)
    assert activated_params(model, 1.0, include_predictor=True) == pytest.approx(
        rest + 2 * expert + pred)


def test_eq40_fine_grained_counts_g_small_experts_as_one():
    a = build_model(small(MoEConfig(type="diffmoe", num_experts=4, granularity=1)))
    b = build_model(small(MoEConfig(type="diffmoe", num_experts=4, granularity=2)))
    ea = a.moe_layers()[0].experts.expert_params()
    eb = b.moe_layers()[0].experts.expert_params()
    # Biases of the second projection are per expert, so g small experts hold g-1 extra D-vectors.
    assert 2 * eb == ea + 8
    # At C = 1 each MoE layer activates g small experts = one full expert (+ g-1 biases), and
    # the router has g times the rows; everything else is identical.
    D = 8
    per_layer = (2 * eb - ea) + (4 * 2 - 4) * D
    assert activated_params(b, 1.0) - activated_params(a, 1.0) == pytest.approx(2 * per_layer)
