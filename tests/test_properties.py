"""Property-based tests: for any batch size, tokens per sample, expert count and capacity, the
routing layers keep their shape, stay finite and respect their per-expert token bounds; the config
parser round-trips what it accepts and rejects with ConfigError what it does not, and reads YAML
as a person does; and no command changes a file it was not asked to write unless --force."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from diffmoe.config import (
    DataConfig,
    MoEConfig,
    SampleConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    overrides_to_dict,
)
from diffmoe.errors import ConfigError
from diffmoe.models.moe import Routing, apply_threshold_updates, build_ffn, expert_capacity

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
    assert out.selection_mask().sum(0).tolist() == [expected] * experts
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
    assert out.selection_mask().sum(0).tolist() == out.counts_E.tolist()


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
    assert out.selection_mask().sum(1).eq(top_k).all()
    assert int(out.counts_E.sum()) == batch * tokens * top_k
    # E * sum_e P_e f_e lies in [0, E] (sum_e f_e = 1 and P_e <= 1); with one expert it is 1.
    aux = out.aux_loss.item()
    assert 0.0 <= aux <= experts + 1e-5
    if experts == 1:
        assert aux == pytest.approx(1.0, abs=1e-5)


@FAST
@given(experts=st.integers(1, 64), share=st.floats(0.01, 1.0), depth=st.integers(1, 30))
def test_config_accepts_valid_values_and_keeps_them(experts, share, depth):
    capacity = share * experts  # up to every expert on every token
    cfg = load_config(None, [f"model.moe.num_experts={experts}", f"model.moe.capacity={capacity}",
                             f"model.depth={depth}", "model.moe.type=diffmoe"])
    assert (cfg.model.moe.num_experts, cfg.model.depth) == (experts, depth)
    assert cfg.model.moe.capacity == pytest.approx(capacity)


@FAST
@given(experts=st.integers(1, 16), excess=st.floats(1.01, 8.0),
       kind=st.sampled_from(["diffmoe", "expert_choice"]))
def test_capacity_above_the_expert_count_is_refused(experts, excess, kind):
    with pytest.raises(ConfigError, match="is more than model.moe.num_experts"):
        load_config(None, [f"model.moe.num_experts={experts}", f"model.moe.type={kind}",
                           f"model.moe.capacity={experts * excess}"])


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


# ---------------------------------------------------------------------------------------------
# More routing properties: extreme capacities, thresholds, gradients, the whole model
# ---------------------------------------------------------------------------------------------

@FAST
@given(batch=st.integers(1, 4), tokens=st.integers(1, 8), experts=st.integers(1, 6),
       capacity=st.sampled_from([0.001, 0.1, 1.0, 3.0, 8.0, 64.0]), seed=st.integers(0, 10_000),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_diffmoe_training_bounds_and_gradients_for_any_capacity(batch, tokens, experts, capacity,
                                                               seed, scale):
    """Capacities far below 1/S or above E clamp to 1 <= k <= S; inputs of any scale give finite
    outputs and gradients; the thresholds stay probabilities (Eq. 17 averages values in [0, 1])."""
    torch.manual_seed(seed)
    layer = build_ffn(MoEConfig(type="diffmoe", num_experts=experts, capacity=capacity),
                      D, HIDDEN).train()
    x = (torch.randn(batch, tokens, D) * scale).requires_grad_()
    for _ in range(3):
        out = layer(x)
        apply_threshold_updates([layer], [out.threshold_targets_E])
    S = batch * tokens
    k = expert_capacity(S, capacity, experts)
    assert 1 <= k <= S
    assert out.counts_E.tolist() == [k] * experts
    assert out.selection_mask().sum(0).tolist() == [k] * experts
    assert out.y.shape == x.shape and torch.isfinite(out.y).all()
    (out.y.square().mean() + out.predictor_loss).backward()
    grads = [x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    tau = layer.thresholds_E
    assert torch.isfinite(tau).all() and (tau >= 0).all() and (tau <= 1).all()


@FAST
@given(batch=st.integers(1, 4), tokens=st.integers(1, 8), experts=st.integers(1, 6),
       seed=st.integers(0, 10_000))
def test_threshold_zero_selects_every_token_and_one_selects_none(batch, tokens, experts, seed):
    """gamma = 0 makes every expert process the whole pool (C = E), gamma = 1 none of it (C = 0,
    the layer adds nothing): the two ends of the interval search (Eq. 16)."""
    torch.manual_seed(seed)
    layer = build_ffn(MoEConfig(type="diffmoe", num_experts=experts), D, HIDDEN).eval()
    x = torch.randn(batch, tokens, D)
    S = batch * tokens
    with torch.no_grad():
        every = layer(x, Routing("threshold", 0.0))
        none = layer(x, Routing("threshold", 1.0))
    assert every.counts_E.tolist() == [S] * experts and bool(every.selection_mask().all())
    assert none.counts_E.tolist() == [0] * experts and not bool(none.selection_mask().any())
    assert torch.isfinite(every.y).all() and torch.equal(none.y, torch.zeros_like(none.y))


TINY_MODEL = ["model.input_size=4", "model.in_channels=1", "model.patch_size=2", "model.depth=2",
              "model.hidden_size=16", "model.num_heads=2", "model.num_classes=3"]


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 6), kind=st.sampled_from(["dense", "token_choice", "expert_choice",
                                                     "diffmoe"]),
       experts=st.integers(1, 4), mode=st.sampled_from(["static", "dynamic", "threshold"]),
       training=st.booleans(), seed=st.integers(0, 10_000))
def test_whole_model_any_batch_size(batch, kind, experts, mode, training, seed):
    """The DiT with every FFN variant, at any batch size including 1, in training and in every
    inference mode its FFN supports: output shape and finiteness hold."""
    from diffmoe.models import build_model
    cfg = load_config(None, TINY_MODEL + [f"model.moe.type={kind}",
                                          f"model.moe.num_experts={experts}"])
    torch.manual_seed(seed)
    model = build_model(cfg.model).train(training)
    if kind != "diffmoe":
        mode = "static"
    x = torch.randn(batch, 1, 4, 4)
    t = torch.rand(batch) * 1000
    y = torch.randint(0, 4, (batch,))  # 3 is the null class
    with torch.set_grad_enabled(training):
        out = model(x, t, y, Routing(mode, 0.5))
    assert out.prediction.shape == (batch, 1, 4, 4) and torch.isfinite(out.prediction).all()


# ---------------------------------------------------------------------------------------------
# More config-parser properties: it never fails with anything but ConfigError
# ---------------------------------------------------------------------------------------------

KEYS = [f"{section}.{f.name}" for section, cls in (("train", TrainConfig), ("sample", SampleConfig),
                                                    ("data", DataConfig))
        for f in dataclasses.fields(cls)] + [
    "model.depth", "model.moe.type", "model.moe.capacity", "model.preset", "model", "moe",
    "model.moe", "train", ""]
VALUES = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["", "null", "[]", "{}", "{a: 1}", "[1, 2", "true", "1e309",
                                    "-0", "0x10", "~", "'", "nan", ".inf"]))


@settings(max_examples=150, deadline=None)
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=15), VALUES),
                          max_size=4))
def test_config_parser_only_ever_raises_config_error(overrides):
    """Whatever is typed on the command line, the parser accepts it or raises ConfigError (which
    the CLI prints as one line): never a TypeError, KeyError or traceback."""
    try:
        cfg = load_config(None, [f"{k}={v}" for k, v in overrides])
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert cfg.model.moe.num_experts > 0 and cfg.train.steps > 0


YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(data=st.dictionaries(st.sampled_from(["model", "train", "sample", "data", "objective",
                                             "extra"]), YAML_VALUES, max_size=4)
       | YAML_VALUES)
def test_config_from_any_yaml_document_only_raises_config_error(data):
    """Any YAML document (nested lists, maps, nulls, NaN) is accepted or rejected with
    ConfigError."""
    try:
        config_from_dict(data)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@FAST
@given(steps=st.integers(1, 10**7), lr=st.floats(1e-8, 10.0), nonfinite=st.sampled_from(
    ["stop", "skip"]), keep=st.integers(1, 50), timeout=st.floats(0.001, 1e5),
       experts=st.integers(1, 32), kind=st.sampled_from(["dense", "token_choice",
                                                          "expert_choice", "diffmoe"]))
def test_valid_config_round_trips_through_yaml(steps, lr, nonfinite, keep, timeout, experts,
                                               kind):
    cfg = load_config(None, [f"train.steps={steps}", f"train.lr={lr!r}",
                             f"train.nonfinite_loss={nonfinite}",
                             f"train.keep_checkpoints={keep}", f"train.dist_timeout_s={timeout!r}",
                             f"model.moe.num_experts={experts}", f"model.moe.type={kind}"])
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


# -- commands write only what they were asked to -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(train_tiny):
    return train_tiny()


# Each command with what it is asked to write into a folder (names in it), and its arguments.
OUTPUT_COMMANDS = {
    "sample": ({"x.png", "x.json"},
               lambda run, d: ["sample", run, "--num", "1", "--steps", "1", "--out", f"{d}/x.png"]),
    "analyze": ({"analysis.json", "capacity_vs_timestep.png", "expert_load.png",
                 "capacity_by_class.png", "capacity_vs_batch_size.png"},
                lambda run, d: ["analyze", run, "--num", "1", "--steps", "1", "--batch-sizes",
                                "1", "--num-per-batch-size", "1", "--no-progress", "--out", d]),
}
NEIGHBOURS = ("x.png", "x.json", "x.npz", "notes.txt", "analysis.json", "expert_load.png",
              "x.png.bak", "y.png")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@settings(max_examples=8, deadline=None)
@given(command=st.sampled_from(sorted(OUTPUT_COMMANDS)), existing=st.sets(st.sampled_from(
    NEIGHBOURS)), force=st.booleans())
def test_commands_change_no_file_they_were_not_asked_to_write(tiny_run, command, existing,
                                                              force):
    from diffmoe.cli import main
    asked, argv = OUTPUT_COMMANDS[command]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in existing:
            (folder / name).write_bytes(f"the user's {name}".encode())
        before = _snapshot(folder)
        rc = main(argv(str(tiny_run), tmp) + (["--force"] if force else []))
        after = _snapshot(folder)
    changed = {name for name in before if after.get(name) != before[name]}
    refused = bool(existing & asked) and not force
    assert rc == (2 if refused else 0)
    assert changed <= (set() if refused else asked)
    assert refused or asked <= set(after)


@FAST
@given(text=st.sampled_from(["no", "off", "On", "YES", "0755", "1:30", "2020-01-01"]),
       key=st.sampled_from(["train.out_dir", "data.split", "data.path"]))
def test_yaml_reads_plain_scalars_as_written_for_a_text_field(text, key):
    from diffmoe.config.loading import read_yaml
    section, name = key.split(".")
    data = read_yaml(f"{section}:\n  {name}: {text}\n")
    assert data[section][name] == text
    assert read_yaml(f"{section}:\n  {name}: true\n")[section][name] is True


@FAST
@given(key=st.sampled_from(["train.lr", "sample.cfg_scale", "model.moe.capacity",
                            "objective.beta_end"]),
       value=st.sampled_from(["inf", "-inf", ".inf", "nan", ".nan"]))
def test_non_finite_numbers_are_refused(key, value):
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(None, [f"{key}={value}", "model.moe.type=diffmoe"])
