"""Checkpoints written by earlier code still load: the state dicts in tests/fixtures (see its
README) have the keys, shapes and parameter order of today's models, load strictly, and give the
forward output recorded with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close

from diffmoe.config import ModelConfig, MoEConfig, TextConfig
from diffmoe.models import build_model
from diffmoe.models.condition import TextCondition
from diffmoe.models.moe import Routing

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_NAMES = ("dit_class", "dit_text")


def _fixture(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(FIXTURES / f"{name}.safetensors"), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _model_config(metadata: dict) -> ModelConfig:
    fields = json.loads(metadata["config"])
    return ModelConfig(**{**fields, "moe": MoEConfig(**fields["moe"]),
                          "text": TextConfig(**fields["text"])})


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_state_dict_keys_shapes_and_order_are_unchanged(name):
    metadata, tensors = _fixture(name)
    model = build_model(_model_config(metadata))
    state = model.state_dict()
    assert list(state) == json.loads(metadata["state_dict_keys"])
    assert [n for n, _ in model.named_parameters()] == json.loads(metadata["parameter_names"])
    recorded = _part(tensors, "model.")
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in recorded.items()}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_recorded_weights_load_strictly_and_give_the_recorded_output(name):
    metadata, tensors = _fixture(name)
    cfg = _model_config(metadata)
    model = build_model(cfg).eval()
    model.load_state_dict(_part(tensors, "model."), strict=True)
    inputs = _part(tensors, "input.")
    if cfg.condition == "text":
        cond = TextCondition(inputs["tokens"], inputs["mask"], inputs["pooled"], inputs["null"])
    else:
        cond = inputs["labels"]
    with torch.no_grad():
        routing = Routing(**json.loads(metadata["routing"]))
        out = model(inputs["x"], inputs["t"], cond, routing).prediction
    assert_close(out, tensors["output"])
