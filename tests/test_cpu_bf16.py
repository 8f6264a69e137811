"""bf16 on the CPU: autocast runs there, a CPU without bf16 units says once that it emulates
them, and sampling casts the experts' weights once instead of at every step."""

import logging
from contextlib import nullcontext

import pytest
import torch

from diffmoe import device as device_module
from diffmoe.config import ModelConfig, MoEConfig
from diffmoe.device import autocast
from diffmoe.diffusion import FlowMatching, sample, samplers
from diffmoe.models import build_model
from diffmoe.models.moe import ExpertBank, Routing, cast_experts_once, diffmoe_layers


def _autocast_twice(caplog) -> list[str]:
    device_module._warn_emulated_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="diffmoe.device"):
        for _ in range(2):
            with autocast("bf16", torch.device("cpu")):
                out = torch.ones(2, 3) @ torch.ones(3, 2)
            assert out.dtype == torch.bfloat16
    device_module._warn_emulated_bf16.cache_clear()
    return [r.getMessage() for r in caplog.records if "bf16 units" in r.getMessage()]


def test_a_cpu_without_bf16_units_is_told_once(monkeypatch, caplog):
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    messages = _autocast_twice(caplog)
    assert len(messages) == 1 and "use precision fp32" in messages[0]


def test_a_cpu_with_bf16_units_runs_bf16_silently(monkeypatch, caplog):
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    assert _autocast_twice(caplog) == []


def test_fp32_never_asks_about_bf16_units(monkeypatch):
    def asked():
        raise AssertionError("fp32 looked for bf16 units")

    monkeypatch.setattr(device_module, "cpu_has_bf16", asked)
    with autocast("fp32", torch.device("cpu")):
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.float32


# -- the experts' weights cast once for sampling ---------------------------------------------

def _diffmoe_model(dispatch: str = "auto") -> torch.nn.Module:
    """A small DiffMoE DiT with perturbed weights (so the experts reach the image) and thresholds
    that route some tokens, not all."""
    cfg = ModelConfig(input_size=8, in_channels=1, patch_size=2, depth=2, hidden_size=32,
                      num_heads=2, num_classes=3,
                      moe=MoEConfig(type="diffmoe", num_experts=4, dispatch=dispatch))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for layer in diffmoe_layers(model):
            layer.thresholds_E.fill_(0.5)
    return model


def _forward(model, x, routing):
    t, y = torch.tensor([0.3, 0.7]), torch.tensor([0, 2])
    return model(x, t, y, routing).prediction


@pytest.mark.parametrize("dispatch", ["padded_bmm", "loop"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_experts_cast_once_compute_what_casting_at_every_forward_computes(dispatch, mode):
    model = _diffmoe_model(dispatch)
    x = torch.randn(2, 1, 8, 8)
    bank = diffmoe_layers(model)[0].experts
    with torch.no_grad(), autocast("bf16", torch.device("cpu")):
        every_forward = _forward(model, x, Routing(mode))
        with cast_experts_once(model, torch.bfloat16):
            held = bank.weights(torch.bfloat16)
            assert bank.weights(torch.bfloat16) is held, "the casts are not held"
            assert [w.dtype for w in held] == [torch.bfloat16] * 4
            once = _forward(model, x, Routing(mode))
        assert bank._held is None
    # The same casts and the same kernels: the same computation, so the same bits.
    assert torch.equal(once, every_forward)


def test_held_casts_serve_no_gradient_and_follow_a_changed_weight():
    model = _diffmoe_model()
    x = torch.randn(2, 1, 8, 8)
    bank = diffmoe_layers(model)[0].experts
    with autocast("bf16", torch.device("cpu")), cast_experts_once(model, torch.bfloat16):
        _forward(model, x, Routing("static")).float().square().sum().backward()
        assert bank.w1_EDF.grad is not None and bank.w1_EDF.grad.abs().sum() > 0
        with torch.no_grad():
            bank.w1_EDF.mul_(2.0)
            changed = bank.weights(torch.bfloat16)[0]
    assert torch.equal(changed, bank.w1_EDF.detach().to(torch.bfloat16))


def test_nothing_is_held_in_float32():
    model = _diffmoe_model()
    with cast_experts_once(model, torch.float32):
        assert all(b._held is None for b in model.modules() if isinstance(b, ExpertBank))


def test_sampling_under_bf16_casts_the_experts_once_with_the_same_images(monkeypatch):
    model = _diffmoe_model()
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    held_dtypes = []

    def spy(net, dtype):
        held_dtypes.append(dtype)
        return cast_experts_once(net, dtype)

    def draw():
        with autocast("bf16", torch.device("cpu")):
            return sample(model, FlowMatching(1), torch.tensor([0, 2]), sampler="euler",
                          steps=3, routing=Routing("dynamic"), noise=noise)

    monkeypatch.setattr(samplers, "cast_experts_once", spy)
    once = draw()
    assert held_dtypes == [torch.bfloat16]
    monkeypatch.setattr(samplers, "cast_experts_once", lambda net, dtype: nullcontext())
    assert torch.equal(once, draw())
