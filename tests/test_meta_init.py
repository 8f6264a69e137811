"""A model built on the meta device and filled from its initialisation plan
(:func:`diffmoe.parallel.materialize`) against the model built whole on the CPU, in one process:
the same weights and buffers, bit for bit, and the CPU generator left where the whole build
leaves it (the same draws in the same order). tests/test_scale.py checks it sharded over 3
ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffmoe import parallel
from diffmoe.config import load_config
from diffmoe.models import DiT, build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CASES = {
    "diffmoe": ("digits_tiny.yaml", []),
    "token-choice": ("digits_tiny.yaml", ["model.moe.type=token_choice"]),
    "expert-choice-shared-fine": ("digits_tiny.yaml", [
        "model.moe.type=expert_choice", "model.moe.shared_experts=1", "model.moe.granularity=2"]),
    "dense-final-conv-sigma": ("digits_tiny.yaml", [
        "model.moe.type=dense", "model.final_conv=true", "model.learn_sigma=true"]),
    "text-dense": ("t2i_shapes_dense.yaml", []),
    "text-diffmoe-final-conv": ("t2i_shapes_diffmoe.yaml", ["model.final_conv=true"]),
}


def every_tensor(model: DiT) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters()) | dict(model.named_buffers())  # pos_embed included


def on_meta_then_filled(cfg) -> DiT:
    module, draws = parallel.build_on_meta(lambda: build_model(cfg.model, initialize=False))
    assert all(p.is_meta for p in module.parameters())
    parallel.materialize(module, draws, torch.device("cpu"))
    return module


@pytest.mark.parametrize("name", CASES)
def test_meta_init_gives_the_weights_of_the_model_built_whole(name):
    path, overrides = CASES[name]
    cfg = load_config(CONFIGS / path, overrides)
    torch.manual_seed(3)
    whole = build_model(cfg.model)
    after_whole = torch.get_rng_state()
    torch.manual_seed(3)
    filled = on_meta_then_filled(cfg)
    a, b = every_tensor(whole), every_tensor(filled)
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, unequal
    assert torch.equal(after_whole, torch.get_rng_state())
    # The weights drew random numbers (a control: a plan of zeros would also be "equal").
    assert a["blocks.0.attn.qkv.weight"].abs().sum() > 0


def test_the_ema_takes_the_filled_model_values():
    cfg = load_config(CONFIGS / "digits_tiny.yaml")
    torch.manual_seed(0)
    module, draws = parallel.build_on_meta(lambda: build_model(cfg.model, initialize=False))
    ema = parallel.build_on_meta(lambda: build_model(cfg.model, initialize=False))[0]
    parallel.materialize(module, draws, torch.device("cpu"))
    parallel.materialize_as(ema, module, torch.device("cpu"))
    a, b = every_tensor(module), every_tensor(ema)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_plan_that_leaves_a_tensor_unset_is_refused(monkeypatch):
    cfg = load_config(CONFIGS / "digits_tiny.yaml")
    full_plan = DiT.init_plan
    monkeypatch.setattr(DiT, "init_plan", lambda self: [
        (name, init) for name, init in full_plan(self) if name != "x_embedder.bias"])
    module, draws = parallel.build_on_meta(lambda: build_model(cfg.model, initialize=False))
    with pytest.raises(RuntimeError, match=r"leaves \['x_embedder.bias'\] without a value"):
        parallel.materialize(module, draws, torch.device("cpu"))
