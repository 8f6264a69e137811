"""Activation checkpointing with ``train.token_pool=global`` (issue 31, item 4): the recompute of a
checkpointed block in the backward reuses the forward's global-pool choice and issues no
collective, so the backward's only collectives are the gradient reduction's.

The 2-rank test runs tests/scale_check.py under torchrun (gloo). The in-process tests stand in for
a second rank with a fake all-gather, to reach what a 2-rank job does not: a second backward
through the same graph, and the guard on the kept choices."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jobs
import pytest
import torch

from diffmoe.config import MoEConfig, load_config
from diffmoe.models import build_model
from diffmoe.models.moe import build_ffn
from diffmoe.models.moe import diffmoe as diffmoe_module
from diffmoe.models.moe.diffmoe import RecomputeChoices

HERE = Path(__file__).parent
ROOT = HERE.parent
TIMEOUT_S = 300
DEPTH = 4  # digits_tiny with 4 blocks: 2 of them DiffMoE (interleaved), each checkpointed
GATHERS_PER_LAYER = 2  # the router scores and the predictor logits
PERTURB_STD = 0.05


COMPILED_GRAD_RTOL = 1e-5  # of the largest gradient: float32 rounding, far below a routing change


def test_checkpointed_global_pool_recompute_issues_no_collective_on_2_ranks(tmp_path):
    report = tmp_path / "recompute.json"
    proc = jobs.torchrun([str(HERE / "scale_check.py"), "recompute",
                          str(ROOT / "configs" / "digits_tiny.yaml"), str(report),
                          f"model.depth={DEPTH}"], TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(report.read_text())
    assert len(ranks) == 2
    for r in ranks:
        gathers = {"allgather_": GATHERS_PER_LAYER * r["moe_layers"]}
        assert r["moe_layers"] == 2
        for name in ("plain", "checkpointed", "compiled"):
            # The forward gathers, the backward issues nothing (before the fix the checkpointed
            # backward gathered again: 4 all-gathers per rank).
            assert r[name] == {"forward": gathers, "backward": {}}, (name, r[name])
        # Under DDP the backward's only collective is its gradient all-reduce (one bucket for
        # this small model); before the fix the recompute's all-gathers ran among them.
        assert r["ddp"]["backward"] == {"allreduce_": 1}, r["ddp"]
        assert r["ddp"]["forward"]["allgather_"] == gathers["allgather_"]
        # Checkpointing recomputes the same ops on the same values in the same process, with
        # the forward's selection: the same computation, so the gradients are bitwise equal.
        # torch.compile (aot_eager) runs the checkpointed blocks eagerly and the rest as traced
        # graphs, which may decompose ops: another computation, compared to rounding (a
        # recompute that chose other tokens would move gradients by about grad_max).
        assert r["grads_missing"] == 0 and r["grad_max"] > 1e-2
        assert r["checkpointed_grads_equal"], r["checkpointed_grad_max_diff"]
        assert r["compiled_grad_max_diff"] <= COMPILED_GRAD_RTOL * r["grad_max"], r


class FakeSecondRank:
    """Rank 0 of a 2-rank world whose all-gather returns this rank's rows and, for rank 1, a fixed
    transformation of them (so a recompute that gathered again would find the same pool); counts
    the gathers."""

    def __init__(self, monkeypatch):
        self.gathers = 0
        monkeypatch.setattr(diffmoe_module, "_world", lambda: (0, 2))
        monkeypatch.setattr(diffmoe_module, "all_gather_rows", self.all_gather_rows)

    def all_gather_rows(self, x):
        self.gathers += 1
        return torch.cat([x, x.flip(0) * 0.5])


def perturbed_global_model(depth: int = DEPTH):
    cfg = load_config(ROOT / "configs" / "digits_tiny.yaml",
                      ["model.class_dropout=0", f"model.depth={depth}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, token_pool="global").train()
    with torch.no_grad():  # leave adaLN-Zero's all-zero start, so that outputs depend on routing
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=PERTURB_STD)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g) * 1000,
             torch.randint(0, 10, (4,), generator=g))
    return model, batch


def loss_of(model, batch):
    out = model(*batch)
    return out.prediction.pow(2).mean() + out.predictor_loss


def grads_of(model):
    return [p.grad.clone() for p in model.parameters()]


def test_a_second_backward_replays_the_kept_choices_again(monkeypatch):
    world = FakeSecondRank(monkeypatch)
    plain, batch = perturbed_global_model()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing = True
    loss_of(plain, batch).backward()
    loss = loss_of(checkpointed, batch)
    assert world.gathers == 2 * GATHERS_PER_LAYER * 2  # both forwards, 2 DiffMoE layers each
    loss.backward(retain_graph=True)
    first = grads_of(checkpointed)
    loss.backward()  # recomputes every block a second time, from the first kept choice again
    assert world.gathers == 2 * GATHERS_PER_LAYER * 2  # neither backward gathered
    # The same computation each time: the first backward equals the plain model's bitwise, the
    # second adds the same gradients again (x + x is exact).
    for p, a, b in zip(plain.parameters(), first, grads_of(checkpointed)):
        assert torch.equal(p.grad, a)
        assert torch.equal(b, 2 * a)
    assert diffmoe_module._ACTIVE_CHOICES.get() is None  # nothing left active after the calls


def test_without_gradients_a_checkpointing_model_gathers_as_usual(monkeypatch):
    world = FakeSecondRank(monkeypatch)
    model, batch = perturbed_global_model()
    model.activation_checkpointing = True
    with torch.no_grad():
        loss_of(model, batch)
    assert world.gathers == GATHERS_PER_LAYER * 2


def test_recompute_choices_refuse_a_recompute_that_runs_other_layers():
    a, b = (build_ffn(MoEConfig(type="diffmoe", num_experts=4), 16, 32, token_pool="global")
            for _ in range(2))
    choices = RecomputeChoices()
    forward, recompute = choices.contexts()
    choice = diffmoe_module.GlobalChoice(torch.arange(3), torch.tensor([1, 1, 1, 0]),
                                         [1, 1, 1, 0], torch.zeros(4), pool=8)
    with forward:
        choices.keep(a, choice)
    with recompute:
        assert choices.take(a, 8) is choice
        with pytest.raises(RuntimeError, match="ran 2 global-pool DiffMoE layers; its forward "
                                               "ran 1"):
            choices.take(a, 8)
    with recompute:  # each recompute starts again from the first kept choice
        with pytest.raises(RuntimeError, match="in order on pools of the same size"):
            choices.take(b, 8)
    with recompute:
        with pytest.raises(RuntimeError, match="a pool of 6 tokens, the forward's had 8"):
            choices.take(a, 6)
