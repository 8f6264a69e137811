"""The training path of the MoE layers and of the whole DiT compiles without graph breaks (with
activation checkpointing too) and runs under bf16 autocast, so the same code is fast on a GPU;
compiled (inductor) training steps and compiled sampling match eager. Where compiled code breaks
its graph, it is at a host read the design needs, and the counts are those documented in
docs/performance.md ("torch.compile")."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch._dynamo

from diffmoe.config import MoEConfig, load_config
from diffmoe.diffusion import build_objective
from diffmoe.diffusion.samplers import sample
from diffmoe.loss import training_loss
from diffmoe.models import build_model
from diffmoe.models.moe import Routing, build_ffn, cast_experts_once, diffmoe_layers

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


@pytest.mark.numerics
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


def break_sites(explanation) -> set[str]:
    """file:function of the innermost frame of every graph break."""
    return {f"{Path(r.user_stack[-1].filename).name}:{r.user_stack[-1].name}"
            for r in explanation.break_reasons}


def tiny_training(kind: str):
    cfg = load_config(ROOT / "configs" / "digits_tiny.yaml", [f"model.moe.type={kind}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    objective = build_objective(cfg)
    x = torch.randn(8, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    y = torch.randint(0, cfg.model.num_classes, (8,))
    return cfg, model, objective, x, y


def test_token_choice_training_breaks_only_where_it_reads_its_largest_count():
    """Token choice's counts depend on the data; without a fast grouped GEMM (here: the CPU) the
    padded bmm reads the largest count, the one graph break of its training path."""
    torch._dynamo.reset()
    cfg, model, objective, x, y = tiny_training("token_choice")
    explanation = torch._dynamo.explain(
        lambda a, b: training_loss(objective.loss(model, a, b), cfg.model.moe).loss)(x, y)
    assert break_sites(explanation) == {"base.py:run_grouped"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["diffmoe", "token_choice"])
def test_compiled_training_steps_match_eager(kind):
    """Three SGD steps of the whole DiT's training loss, inductor-compiled and eager from the
    same weights on the same batches: the same losses, thresholds and weights."""
    torch._dynamo.reset()
    cfg, eager, objective, x, y = tiny_training(kind)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(lambda a, b, g: training_loss(
        objective.loss(twin, a, b, generator=g), cfg.model.moe).loss)
    runs = [(eager, lambda a, b, g: training_loss(
        objective.loss(eager, a, b, generator=g), cfg.model.moe).loss), (twin, compiled)]
    losses = {0: [], 1: []}
    for step in range(3):
        for i, (model, loss_fn) in enumerate(runs):
            model.zero_grad(set_to_none=True)
            out = loss_fn(x, y, torch.Generator().manual_seed(step))
            out.backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 0.1 * p.grad
            losses[i].append(out.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def tiny_sampling():
    cfg = load_config(ROOT / "configs" / "digits_tiny.yaml", [])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    for p in model.parameters():  # leave adaLN-Zero so the layers see varied inputs
        torch.nn.init.normal_(p, std=0.05)
    for layer in diffmoe_layers(model):
        layer.thresholds_E.fill_(0.5)
    return model, build_objective(cfg)


@pytest.mark.parametrize("mode", ["dynamic", "threshold", "static"])
def test_sampling_forward_graph_breaks(mode):
    """Static inference is one graph; dynamic inference breaks only where each DiffMoE layer's
    dynamic tail (the counts read to the host, then what depends on them) runs eagerly."""
    torch._dynamo.reset()
    model, _ = tiny_sampling()
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 10])
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x, t, y, Routing(mode))
    if mode == "static":
        assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    else:
        assert break_sites(explanation) == {"diffmoe.py:forward_infer"}


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_bf16_sampling_with_the_experts_cast_once_adds_no_graph_break(mode):
    """The held casts are read eagerly only: compiled code casts in its graph, as without them."""
    torch._dynamo.reset()
    model, _ = tiny_sampling()
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 10])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), \
            cast_experts_once(model, torch.bfloat16):
        explanation = torch._dynamo.explain(model)(x, t, y, Routing(mode))
    if mode == "static":
        assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    else:
        assert break_sites(explanation) == {"diffmoe.py:forward_infer"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_compiled_sampling_matches_eager(mode):
    """Guided Euler sampling with the inductor-compiled model gives the eager images, with the
    same expert counts at every model call."""
    torch._dynamo.reset()
    model, objective = tiny_sampling()
    compiled = torch.compile(model)
    images, counts = [], []
    for net in (model, compiled):
        seen = []
        images.append(sample(net, objective, torch.tensor([0, 1, 2, 3]), steps=3, cfg_scale=1.5,
                             routing=Routing(mode), generator=torch.Generator().manual_seed(0),
                             on_forward=lambda t, o, seen=seen: seen.append(
                                 [layer.counts_E.tolist() for layer in o.layers])))
        counts.append(seen)
    assert counts[1] == counts[0] and len(counts[0]) == 3
    torch.testing.assert_close(images[1], images[0], rtol=1e-4, atol=1e-4)
