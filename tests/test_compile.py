"""The training path of the MoE layers compiles without graph breaks and runs under bf16
autocast, so the same code is fast on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from diffmoe.config import MoEConfig
from diffmoe.models.moe import build_ffn

D, HIDDEN = 32, 64


@pytest.mark.parametrize("kind", ["diffmoe", "expert_choice", "dense"])
def test_training_path_has_no_graph_breaks(kind):
    torch._dynamo.reset()
    layer = build_ffn(MoEConfig(type=kind, num_experts=4), D, HIDDEN).train()
    x = torch.randn(2, 8, D, requires_grad=True)

    def step(inp):
        out = layer(inp)
        loss = out.y.square().mean()
        if out.predictor_loss is not None:
            loss = loss + out.predictor_loss
        return loss

    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("kind", ["diffmoe", "expert_choice", "token_choice", "dense"])
def test_bf16_autocast_training_step(kind):
    torch.manual_seed(0)
    layer = build_ffn(MoEConfig(type=kind, num_experts=4), D, HIDDEN).train()
    x = torch.randn(2, 8, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    loss = out.y.square().mean() + (out.predictor_loss if out.predictor_loss is not None else 0)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    ref = build_ffn(MoEConfig(type=kind, num_experts=4), D, HIDDEN).train()
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(out.y.float(), ref(x.detach()).y, rtol=0.05, atol=0.05)


def test_compiled_diffmoe_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = build_ffn(MoEConfig(type="diffmoe", num_experts=4), D, HIDDEN).train()
    x = torch.randn(2, 8, D)
    eager = layer(x).y
    before = layer.thresholds_E.clone()
    compiled = torch.compile(layer, backend="aot_eager")
    with torch.no_grad():
        layer.thresholds_E.copy_(before)
    out = compiled(x)
    torch.testing.assert_close(out.y, eager)
    # The in-place threshold update happens inside the compiled graph too.
    assert not torch.equal(layer.thresholds_E, before)
