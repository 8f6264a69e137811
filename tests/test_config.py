"""Config loading, overrides, presets and validation."""

from __future__ import annotations

import pytest
import torch

from diffmoe.capacity import activated_params
from diffmoe.config import load_config, parse_override, preset
from diffmoe.errors import ConfigError
from diffmoe.models import build_model


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  depth: 3\n  moe:\n    type: diffmoe\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["model.moe.num_experts=8", "train.lr=1e-4", "model.learn_sigma=true",
                             "train.out_dir=somewhere"])
    assert cfg.model.depth == 3
    assert cfg.model.moe.type == "diffmoe" and cfg.model.moe.num_experts == 8
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.learn_sigma is True and cfg.train.out_dir == "somewhere"


def test_preset_applies_first_and_yaml_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: DiffMoE-L-E8\n  depth: 2\n")
    cfg = load_config(path, ["model.moe.capacity=0.5"])
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.depth) == (1024, 16, 2)
    assert cfg.model.moe.type == "diffmoe" and cfg.model.moe.num_experts == 8
    assert cfg.model.moe.capacity == 0.5


@pytest.mark.parametrize("overrides, fragment", [
    (["model.moe.num_expert=8"], "did you mean 'model.moe.num_experts'"),
    (["modle.depth=2"], "unknown config key 'modle'"),
    (["model.moe.num_experts=0"], "model.moe.num_experts=0 must be a positive integer"),
    (["model.moe.type=diffmoe", "model.moe.capacity=0"], "model.moe.capacity=0.0 must be positive"),
    (["model.moe.type=diffmoe", "model.moe.capacity=-1"], "must be positive"),
    (["model.input_size=30", "model.patch_size=4"], "not divisible by model.patch_size=4"),
    (["model.depth=two"], "expects an int"),
    (["model.moe.type=difmoe"], "did you mean 'diffmoe'"),
    (["sample.sampler=rk4"], "sample.sampler='rk4' is not one of"),
    (["model.preset=DiffMoE-M-E16"], "unknown model.preset"),
    (["model.preset=DiffMoE-S"], "needs an expert count"),
    (["model.moe.type=token_choice", "model.moe.capacity=1.5"], "must be a whole number"),
    (["model.hidden_size=100", "model.num_heads=3"], "not divisible by model.num_heads"),
    (["sample.mode=dynamic"], "needs a capacity predictor"),
    (["train.steps=0"], "train.steps=0 must be a positive integer"),
    (["model.depth"], "not of the form key=value"),
])
def test_bad_values_name_the_key_and_fix(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert fragment in msg and "\n" not in msg


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=x=y") == (["a"], "x=y")


def test_roundtrip_yaml():
    cfg = load_config(None, ["model.preset=EC-DiT-B-E4"])
    import yaml

    from diffmoe.config import config_from_dict
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


# paper §1: total and activated parameters of the presets.
PAPER_SIZES = [
    ("DiffMoE-S-E16", 139e6, 32e6),
    ("DiffMoE-B-E16", 555e6, 130e6),
    ("DiffMoE-L-E8", 1.176e9, 458e6),
    ("DiffMoE-L-E16", 1.982e9, 458e6),
    ("DiffMoE-XL-E16", 2.9e9, 675e6),
]


@pytest.mark.parametrize("name, total, activated", PAPER_SIZES)
def test_preset_parameter_counts_match_paper(name, total, activated):
    cfg = load_config(None, [f"model.preset={name}"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert model.num_params() == pytest.approx(total, rel=0.01)
    # The paper rounds S-E16's 32.9M down to 32M; the others match to 0.1%.
    assert activated_params(model, 1.0) == pytest.approx(activated, rel=0.03)
    dense = load_config(None, [f"model.preset=Dense-DiT-{name.split('-')[1]}"])
    with torch.device("meta"):
        dense_model = build_model(dense.model)
    # "Activated parameters 1x": the MoE model at C=1 costs what the dense model costs.
    assert activated_params(model, 1.0) == pytest.approx(dense_model.num_params(), rel=0.002)


def test_all_preset_names_resolve():
    for family in ("DiffMoE", "TC-DiT", "EC-DiT"):
        for size in ("S", "B", "L", "XL"):
            for e in (4, 8, 16):
                m = preset(f"{family}-{size}-E{e}")
                assert m["moe"]["num_experts"] == e
    assert preset("Dense-DiT-XL")["depth"] == 28
