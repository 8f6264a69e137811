"""Flow-matching objective, ODE samplers and classifier-free guidance."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from diffmoe.config import ModelConfig, MoEConfig
from diffmoe.diffusion import FlowMatching, euler, guided_velocity, heun, sample
from diffmoe.models import build_model
from diffmoe.models.moe import Routing


def test_path_endpoints_and_target():
    x, eps = torch.randn(4, 3), torch.randn(4, 3)
    fm = FlowMatching(3)
    assert_close(fm.interpolate(x, eps, torch.zeros(4)), eps)  # t = 0: noise
    assert_close(fm.interpolate(x, eps, torch.ones(4)), x)  # t = 1: data
    t = torch.full((4,), 0.3)
    # The target is the time derivative of the path.
    h = 1e-3
    deriv = (fm.interpolate(x, eps, t + h) - fm.interpolate(x, eps, t - h)) / (2 * h)
    assert_close(deriv, fm.target(x, eps), rtol=1e-3, atol=1e-3)


def test_loss_parts_and_learn_sigma_ignored():
    cfg = ModelConfig(input_size=4, in_channels=2, patch_size=2, depth=2, hidden_size=16,
                      num_heads=2, num_classes=3, learn_sigma=True,
                      moe=MoEConfig(type="diffmoe", num_experts=2))
    model = build_model(cfg).train()
    fm = FlowMatching(2)
    out = fm.loss(model, torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 0]))
    assert out.model_output.out.shape[1] == 4
    assert_close(out.loss, out.diffusion_loss + out.aux_loss + out.predictor_loss)
    assert out.predictor_loss > 0


def linear_ode(z: torch.Tensor, t: float, a: float = -1.3) -> torch.Tensor:
    return a * z


@pytest.mark.parametrize("method, order", [(euler, 1), (heun, 2)])
def test_samplers_integrate_linear_ode_with_expected_order(method, order):
    z0 = torch.ones(1, dtype=torch.float64)
    exact = math.exp(-1.3)
    errors = [abs(method(linear_ode, z0, n).item() - exact) for n in (10, 20, 40)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.15 for r in rates), rates
    # Each method's exact discrete solution of z' = a z: (1 + ah)^N and (1 + ah + (ah)^2/2)^N.
    n, ah = 40, -1.3 / 40
    growth = 1 + ah if order == 1 else 1 + ah + ah * ah / 2
    assert method(linear_ode, z0, n).item() == pytest.approx(growth ** n, rel=1e-12)


def test_samplers_integrate_time_dependent_ode():
    # dz/dt = 2t  ->  z(1) = z(0) + 1; Heun is exact for a linear-in-t field.
    z0 = torch.zeros(1, dtype=torch.float64)
    assert abs(heun(lambda z, t: torch.full_like(z, 2 * t), z0, 7).item() - 1.0) < 1e-12
    assert abs(euler(lambda z, t: torch.full_like(z, 2 * t), z0, 100).item() - 1.0) < 0.011


class FixedModel(torch.nn.Module):
    """A stand-in model whose output depends on the label: v = label value (null → 0)."""

    def __init__(self):
        super().__init__()
        self.cfg = ModelConfig(input_size=2, in_channels=1, num_classes=3)

    def forward(self, x, t, y, routing=None):
        from diffmoe.models.dit import DiTOutput
        v = torch.where(y == 3, 0.0, y.float() + 1.0).view(-1, 1, 1, 1).expand_as(x)
        return DiTOutput(out=v.clone(), aux_loss=torch.zeros(()), predictor_loss=torch.zeros(()))

    def null_condition(self, y):
        return torch.full_like(y, 3)

    cat_conditions = staticmethod(lambda a, b: torch.cat([a, b]))


def test_cfg_formula():
    fm = FlowMatching(1)
    model = FixedModel()
    z = torch.zeros(2, 1, 2, 2)
    y = torch.tensor([0, 2])
    v1 = guided_velocity(model, fm, z, 0.5, y, 1.0, Routing())
    assert_close(v1[:, 0, 0, 0], torch.tensor([1.0, 3.0]))
    v4 = guided_velocity(model, fm, z, 0.5, y, 4.0, Routing())
    # v_u + s (v_c - v_u) with v_u = 0
    assert_close(v4[:, 0, 0, 0], torch.tensor([4.0, 12.0]))


def test_sample_runs_every_mode_and_reports_capacity():
    cfg = ModelConfig(input_size=4, in_channels=1, patch_size=2, depth=2, hidden_size=16,
                      num_heads=2, num_classes=3, moe=MoEConfig(type="diffmoe", num_experts=2))
    model = build_model(cfg).eval()
    seen = []
    for mode in ("dynamic", "static", "threshold"):
        for sampler in ("euler", "heun"):
            out = sample(model, FlowMatching(1), torch.tensor([0, 1, 2]), sampler=sampler,
                         steps=3, cfg_scale=1.5, routing=Routing(mode, 0.5),
                         on_forward=lambda t, o: seen.append(o.layers[0].counts_E))
            assert out.shape == (3, 1, 4, 4) and torch.isfinite(out).all()
    assert len(seen) == 3 * (3 + 6)
