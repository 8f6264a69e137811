"""The training path of the MoE layers and of the whole DiT compiles without graph breaks (with
activation checkpointing too) and runs under bf16 autocast, so the same code is fast on a GPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch._dynamo

from diffmoe.config import MoEConfig, load_config
from diffmoe.diffusion import build_objective
from diffmoe.loss import training_loss
from diffmoe.models import build_model
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
    eager = layer(x)
    before = layer.thresholds_E.clone()
    compiled = torch.compile(layer, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out.y, eager.y)
    # The compiled forward records the same threshold targets, and like the eager one moves
    # no threshold (the update is applied outside the forward).
    torch.testing.assert_close(out.threshold_targets_E, eager.threshold_targets_E)
    assert torch.equal(layer.thresholds_E, before)


ROOT = Path(__file__).resolve().parents[1]


def test_whole_diffmoe_training_loss_with_activation_checkpointing_has_no_graph_break():
    """The DiT's training loss (flow matching, DiffMoE blocks, every block checkpointed) is one
    graph. Before the threshold update moved out of the forward, checkpointing needed a
    context_fn that Dynamo refuses."""
    torch._dynamo.reset()
    cfg = load_config(ROOT / "configs" / "digits_tiny.yaml", [])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    model.activation_checkpointing = True
    objective = build_objective(cfg)
    x = torch.randn(8, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    y = torch.randint(0, cfg.model.num_classes, (8,))
    explanation = torch._dynamo.explain(
        lambda a, b: training_loss(objective.loss(model, a, b), cfg.model.moe).loss)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_training_with_compile_and_activation_checkpointing(train_tiny):
    """train.compile=true train.activation_checkpointing=true trains (inductor on the CPU): the
    loss is finite and the thresholds moved, once per step."""
    torch._dynamo.reset()
    run = train_tiny("train.log_every=1", "train.compile=true",
                     "train.activation_checkpointing=true")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    # threshold_mean is τ as each step's forward saw it: 0 (the start) at step 1, then moved.
    assert records[0]["threshold_mean"] == 0 < records[1]["threshold_mean"]
