"""Flow-matching objective, ODE samplers and classifier-free guidance."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from diffmoe.config import ModelConfig, MoEConfig
from diffmoe.diffusion import FlowMatching, dopri5, euler, guided_velocity, heun, sample, sde
from diffmoe.errors import ConfigError
from diffmoe.loss import training_loss
from diffmoe.models import build_model
from diffmoe.models.moe import Routing, diffmoe_layers

# Samplers against closed forms, and images alone against in a batch (make test reruns these on
# another code path).
pytestmark = pytest.mark.numerics


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
    parts = fm.loss(model, torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 0]))
    assert parts.model_output.prediction.shape[1] == 4
    out = training_loss(parts, cfg.moe)
    assert_close(out.loss, out.diffusion_loss + out.aux_loss + out.predictor_loss)
    assert out.predictor_loss > 0


def test_training_times_uniform_or_logit_normal():
    """Uniform draws what torch.rand draws (so runs from before the option reproduce); logit-normal
    is sigmoid(m + s·n) of the generator's normal draws, and the loss trains the model at them."""
    def draw(fm):
        return fm.draw_times(6, torch.device("cpu"), torch.Generator().manual_seed(3))

    expected = torch.rand(6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(draw(FlowMatching(1)), expected)
    fm = FlowMatching(1, time_scale=10.0, time_sampling="logit_normal", logit_mean=-0.5,
                      logit_std=2.0)
    normal = torch.randn(6, generator=torch.Generator().manual_seed(3))
    assert_close(draw(fm), torch.sigmoid(-0.5 + 2.0 * normal))

    seen = []

    def model(z, model_t, y):
        seen.append(model_t)
        return type("Out", (), {"prediction": torch.zeros_like(z)})()

    fm.loss(model, torch.zeros(6, 1, 2, 2), torch.zeros(6, dtype=torch.long),
            torch.Generator().manual_seed(3))
    assert_close(seen[0], 10.0 * torch.sigmoid(-0.5 + 2.0 * normal))
    with pytest.raises(ValueError, match="time_sampling 'lognormal'"):
        FlowMatching(1, time_sampling="lognormal")


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
        return DiTOutput(prediction=v.clone())

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
    # The adaptive and stochastic samplers too, with capacity reported at every model call.
    for mode in ("dynamic", "static", "threshold"):
        for sampler in ("dopri5", "sde"):
            times = []
            out = sample(model, FlowMatching(1), torch.tensor([0, 1, 2]), sampler=sampler,
                         steps=3, cfg_scale=1.5, routing=Routing(mode, 0.5),
                         on_forward=lambda t, o, ts=times: ts.append(t))
            assert out.shape == (3, 1, 4, 4) and torch.isfinite(out).all()
            assert len(times) >= (6 if sampler == "dopri5" else 3)
            assert min(times) == 0.0 and max(times) <= 1.0


def diffmoe_with_working_experts() -> torch.nn.Module:
    """A small DiffMoE DiT (float64) whose zero-initialised layers are perturbed, so that the MoE
    layers' outputs reach the image, with thresholds that route some tokens, not all."""
    cfg = ModelConfig(input_size=8, in_channels=1, patch_size=2, depth=2, hidden_size=16,
                      num_heads=2, num_classes=3, moe=MoEConfig(type="diffmoe", num_experts=4))
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for layer in diffmoe_layers(model):
            layer.thresholds_E.fill_(0.5)
    return model


def test_predictor_mode_samples_an_image_alone_as_inside_any_batch():
    model = diffmoe_with_working_experts()
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0])

    def draw(mode: str, rows: slice, cfg_scale: float) -> torch.Tensor:
        return sample(model, FlowMatching(1), labels[rows], sampler="euler", steps=4,
                      cfg_scale=cfg_scale, routing=Routing(mode), noise=noise[rows])

    for cfg_scale in (1.0, 2.0):
        for mode, independent in (("predictor", True), ("dynamic", False)):
            together = draw(mode, slice(0, 4), cfg_scale)
            pairs = torch.cat([draw(mode, slice(0, 2), cfg_scale),
                               draw(mode, slice(2, 4), cfg_scale)])
            alone = torch.cat([draw(mode, slice(i, i + 1), cfg_scale) for i in range(4)])
            if independent:
                assert_close(alone, together, rtol=0, atol=1e-12)
                assert_close(pairs, together, rtol=0, atol=1e-12)
            else:  # the paper's dynamic mode: an image depends on the rest of its batch
                assert not torch.allclose(alone, together, atol=1e-6)


def test_given_noise_is_where_sampling_starts():
    model = diffmoe_with_working_experts()
    noise = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    drawn = torch.randn(2, 1, 8, 8, generator=gen).double()
    a = sample(model, FlowMatching(1), torch.tensor([0, 1]), sampler="euler", steps=2,
               routing=Routing("predictor"), noise=drawn)
    b = sample(model.float(), FlowMatching(1), torch.tensor([0, 1]), sampler="euler", steps=2,
               routing=Routing("predictor"), generator=torch.Generator().manual_seed(3))
    assert_close(a.float(), b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="starting noise of shape"):
        sample(model, FlowMatching(1), torch.tensor([0]), noise=noise)


def test_dopri5_integrates_a_linear_ode_to_its_tolerance():
    z0 = torch.ones(3, dtype=torch.float64)
    for rtol in (1e-3, 1e-6):
        got = dopri5(linear_ode, z0, rtol=rtol, atol=rtol * 1e-3)
        assert abs(got[0].item() - math.exp(-1.3)) < 10 * rtol


DATA_MEAN, DATA_STD = 0.4, 0.5


def gaussian_velocity(z: torch.Tensor, t: float) -> torch.Tensor:
    """The exact velocity for data x ~ N(m, s^2): with V = t^2 s^2 + (1-t)^2,
    v = m + (t s^2 - (1 - t)) / V * (z - t m)."""
    var = t * t * DATA_STD ** 2 + (1 - t) ** 2
    return DATA_MEAN + (t * DATA_STD ** 2 - (1 - t)) / var * (z - t * DATA_MEAN)


def test_ode_samplers_follow_the_gaussian_flow_map():
    """The flow ODE maps noise z0 to m + s z0 exactly (it keeps z's standardised value)."""
    z0 = torch.randn(256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = DATA_MEAN + DATA_STD * z0
    for method, order in ((euler, 1), (heun, 2)):
        errors = [(method(gaussian_velocity, z0, n) - exact).abs().max().item()
                  for n in (50, 100, 200)]
        rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
        assert all(abs(r - order) < 0.2 for r in rates), (method.__name__, errors)
    assert (heun(gaussian_velocity, z0, 200) - exact).abs().max() < 1e-4
    assert (dopri5(gaussian_velocity, z0, rtol=1e-7, atol=1e-9) - exact).abs().max() < 1e-5


def test_sde_sampler_reaches_the_data_distribution():
    z0 = torch.randn(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = sde(gaussian_velocity, z0, 200, noise=1.0, generator=torch.Generator().manual_seed(2))
    assert out.mean().item() == pytest.approx(DATA_MEAN, abs=0.015)
    assert out.std().item() == pytest.approx(DATA_STD, rel=0.02)
    # Not a relabelled ODE: the noise moves samples away from the ODE's map.
    assert (out - (DATA_MEAN + DATA_STD * z0)).abs().mean() > 0.1
    # With w = 0 the SDE sampler is Euler, bit for bit on any CPU: it subtracts an exact zero.
    assert torch.equal(sde(gaussian_velocity, z0, 20, noise=0.0), euler(gaussian_velocity, z0, 20))


def test_sampler_must_match_the_objective():
    cfg = ModelConfig(input_size=4, in_channels=1, patch_size=2, depth=2, hidden_size=16,
                      num_heads=2, num_classes=3)
    model = build_model(cfg).eval()
    with pytest.raises(ConfigError, match="^sampler='ddim' is not available for objective.type"):
        sample(model, FlowMatching(1), torch.tensor([0]), sampler="ddim", steps=2)
    with pytest.raises(ConfigError, match="positive"):
        sample(model, FlowMatching(1), torch.tensor([0]), sampler="euler", steps=0)
