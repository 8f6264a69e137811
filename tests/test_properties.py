"""Property-based tests: for any batch size, tokens per sample, expert count and capacity, the
routing layers keep their shape, stay finite and respect their per-expert token bounds; the config
parser round-trips what it accepts and rejects with ConfigError what it does not."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffmoe.config import MoEConfig, load_config, overrides_to_dict
from diffmoe.errors import ConfigError
from diffmoe.models.moe import Routing, build_ffn, expert_capacity

D, HIDDEN = 8, 16
FAST = settings(max_examples=40, deadline=None)


@FAST
@given(batch=st.integers(1, 5), tokens=st.integers(1, 9), experts=st.integers(1, 6),
       capacity=st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0]),
       kind=st.sampled_from(["diffmoe", "expert_choice"]), seed=st.integers(0, 10_000))
def test_expert_choice_layers_any_shape(batch, tokens, experts, capacity, kind, seed):
    torch.manual_seed(seed)
    layer = build_ffn(MoEConfig(type=kind, num_experts=experts, capacity=capacity), D, HIDDEN)
    x = torch.randn(batch, tokens, D)
    out = layer.train()(x)
    assert out.y.shape == x.shape and torch.isfinite(out.y).all()
    pool = batch * tokens if kind == "diffmoe" else tokens
    k = expert_capacity(pool, capacity, experts)
    expected = k if kind == "diffmoe" else k * batch
    assert out.mask_SE.sum(0).tolist() == [expected] * experts
    assert 1 <= k <= pool


@FAST
@given(batch=st.integers(1, 5), tokens=st.integers(1, 9), experts=st.integers(1, 6),
       gamma=st.floats(0.0, 1.0), seed=st.integers(0, 10_000),
       mode=st.sampled_from(["dynamic", "threshold", "static"]))
def test_diffmoe_inference_counts_within_bounds(batch, tokens, experts, gamma, seed, mode):
    torch.manual_seed(seed)
    layer = build_ffn(MoEConfig(type="diffmoe", num_experts=experts), D, HIDDEN).eval()
    with torch.no_grad():
        layer.thresholds_E.uniform_(0, 1)
        out = layer(torch.randn(batch, tokens, D), Routing(mode, gamma))
    S = batch * tokens
    assert out.y.shape == (batch, tokens, D) and torch.isfinite(out.y).all()
    assert ((out.counts_E >= 0) & (out.counts_E <= S)).all()
    assert out.mask_SE.sum(0).tolist() == out.counts_E.tolist()


@FAST
@given(batch=st.integers(1, 4), tokens=st.integers(1, 8), experts=st.integers(1, 5),
       top_k=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_token_choice_any_shape(batch, tokens, experts, top_k, seed):
    top_k = min(top_k, experts)
    torch.manual_seed(seed)
    layer = build_ffn(MoEConfig(type="token_choice", num_experts=experts, capacity=top_k),
                      D, HIDDEN)
    out = layer(torch.randn(batch, tokens, D))
    assert out.y.shape == (batch, tokens, D) and torch.isfinite(out.y).all()
    assert out.mask_SE.sum(1).eq(top_k).all()
    assert int(out.counts_E.sum()) == batch * tokens * top_k
    # E * sum_e P_e f_e lies in [0, E] (sum_e f_e = 1 and P_e <= 1); with one expert it is 1.
    aux = out.aux_loss.item()
    assert 0.0 <= aux <= experts + 1e-5
    if experts == 1:
        assert aux == pytest.approx(1.0, abs=1e-5)


@FAST
@given(experts=st.integers(1, 64), capacity=st.floats(0.01, 8.0), depth=st.integers(1, 30))
def test_config_accepts_valid_values_and_keeps_them(experts, capacity, depth):
    cfg = load_config(None, [f"model.moe.num_experts={experts}", f"model.moe.capacity={capacity}",
                             f"model.depth={depth}", "model.moe.type=diffmoe"])
    assert (cfg.model.moe.num_experts, cfg.model.depth) == (experts, depth)
    assert cfg.model.moe.capacity == pytest.approx(capacity)


@FAST
@given(key=st.sampled_from(["model.moe.num_experts", "model.depth", "train.steps",
                            "train.batch_size", "sample.steps"]),
       value=st.one_of(st.integers(-100, 0), st.text(min_size=1, max_size=5).filter(
           lambda s: not s.strip().lstrip("+-").isdigit() and "=" not in s)))
def test_config_rejects_bad_values_with_config_error(key, value):
    with pytest.raises(ConfigError):
        load_config(None, [f"{key}={value}"])


@FAST
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(-5, 5)), max_size=5))
def test_overrides_nest_by_dots(pairs):
    overrides = [f"x.{k}={v}" for k, v in pairs]
    nested = overrides_to_dict(overrides)
    expected = {}
    for k, v in pairs:
        expected[k] = v
    assert nested.get("x", {}) == expected
