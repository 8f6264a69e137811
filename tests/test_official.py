"""import-official / export-official against files built as the authors' code writes them.

The inputs follow their public code, not our exporter: the YAML of their
config/000_DiffMoE_S_E16_Flow.yaml (``MoE_config`` under ``model.params``, ``basic.rf``), a state
dict under their key names with their buffers (``expert_threshold`` and ``ema_decay`` per MoE
layer, ``pos_embed``), and their train.py's experiment folder (``config_<time>.yaml`` beside
``checkpoints/NNNNNNN.pt`` holding ``{"model", "ema", "opt", "args"}``). Our model must then
reproduce a plain functional forward computed from *their* tensors (eval with their thresholds,
dynamic; train-mode selections), and sampling must feed the timestep embedder their time
convention without any override."""

from __future__ import annotations

import argparse
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file
from tiny_vae import save_tiny_vae

from diffmoe import DiffMoEPipeline
from diffmoe.checkpoint import open_checkpoint, save_checkpoint
from diffmoe.cli import main
from diffmoe.config import config_from_dict
from diffmoe.errors import ConfigError
from diffmoe.hub import load_pretrained
from diffmoe.models import build_model
from diffmoe.models.dit import TimestepEmbedder, sincos_pos_embed_2d
from diffmoe.models.moe import Routing
from diffmoe.train import check_data_matches_model

ARCH = dict(depth=4, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=10)
MOE_BLOCKS = (1, 3)  # their interleave: MoE in the odd blocks
EXPERTS, CAPACITY = 4, 1
CHANNELS = 4
MLP_RATIO = 4
SHARED_WIDTH = 8  # their shared expert: one MLP 2 * 4.0 * D wide
ALPHA = 0.9  # their ema_decay buffer (their code starts it at 0.95, our default: differ on purpose)
PREDICTOR_WEIGHT = 0.5  # their CapacityPred_loss_weight, summed over MoE layers
SCALE = 0.2  # std of the random tensors
ROUTER_SCALE = 2  # sharper router scores, yet no float32 ties at 1.0 that top-k would break apart
EXP = "exps/0003-000_DiffMoE_T_E4_Flow"
YAML_NAME = "config_2025-02-08T10-14-26.yaml"
STEP = 100
CKPT = f"{EXP}/checkpoints/{STEP:07d}.pt"
THEIR_DOWNSAMPLING = 8  # SD's VAE, as their sampler assumes (latent_size = image_size // 8)
IMAGE_SIZE = ARCH["input_size"] * THEIR_DOWNSAMPLING
THEIR_LATENTS = {"name": "latents", "path": "", "scale_factor": 0.18215, "shift_factor": 0.0,
                 "downsampling": THEIR_DOWNSAMPLING}


def their_yaml(rf=True, n_shared=0, **params) -> dict:
    """Their YAML as their train.py saves it (OmegaConf.save of config/000_DiffMoE_S_E16_Flow.yaml),
    every key theirs, tiny values."""
    return {
        "basic": {"exp_name": "000_DiffMoE_T_E4_Flow", "results_dir": "exps/",
                  "data_path": "/ImageNet1K/train", "global_seed": 1234, "epochs": 1000,
                  "log_every": 100, "ckpt_every": 50000, "rf": rf, "rf_ori": False,
                  "accum_iter": 1, "clip_grad_norm": None, "image_size": 64,
                  "global_batch_size": 512, "num_workers": 16, "timestep_start": 0,
                  "timestep_end": 1000, "vae_path": "stabilityai/sd-vae-ft-mse",
                  "dataset_config": {"target": "dataset.dataset_cache.CachedFolder",
                                     "params": {"root": "cache/"}}},
        "model": {"ckpt": None, "target": "models.models_DiffMoE.DiT", "params": {
            "input_size": ARCH["input_size"], "num_classes": ARCH["num_classes"],
            "patch_size": ARCH["patch_size"], "depth": ARCH["depth"],
            "hidden_size": ARCH["hidden_size"], "num_heads": ARCH["num_heads"],
            "mlp_ratio": MLP_RATIO, "use_swiglu": False,
            "MoE_config": {"n_shared_experts": n_shared, "num_experts": EXPERTS,
                           "capacity": CAPACITY, "init_MoeMLP": False, "interleave": True},
            "CapacityPred_loss_weight": PREDICTOR_WEIGHT, **params}},
        "optim": {"base_learning_rate": 0.0001, "weight_decay": 0, "betas": [0.9, 0.999]},
        "lr_sheduler": {"warmup": None, "train_epoch": None}}


def their_state_dict(seed: int = 0, learn_sigma: bool = True, n_shared: int = 0,
                     alpha: float = ALPHA, channels: int = CHANNELS) -> dict[str, torch.Tensor]:
    """Random tensors under the authors' key names and shapes (nn.Linear: (out, in)), with the
    buffers their model registers."""
    g = torch.Generator().manual_seed(seed)
    D, p, E = ARCH["hidden_size"], ARCH["patch_size"], EXPERTS
    F_ = MLP_RATIO * D
    out_ch = channels * (2 if learn_sigma else 1)

    def r(*shape):
        return torch.randn(*shape, generator=g) * SCALE

    def mlp(prefix, width):
        return {f"{prefix}.fc1.weight": r(width, D), f"{prefix}.fc1.bias": r(width),
                f"{prefix}.fc2.weight": r(D, width), f"{prefix}.fc2.bias": r(D)}

    sd = {"x_embedder.proj.weight": r(D, channels, p, p), "x_embedder.proj.bias": r(D),
          "pos_embed": torch.from_numpy(sincos_pos_embed_2d(D, ARCH["input_size"] // p))[None],
          "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
          "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
          "y_embedder.embedding_table.weight": r(ARCH["num_classes"] + 1, D),
          "final_layer.linear.weight": r(p * p * out_ch, D),
          "final_layer.linear.bias": r(p * p * out_ch),
          "final_layer.adaLN_modulation.1.weight": r(2 * D, D),
          "final_layer.adaLN_modulation.1.bias": r(2 * D)}
    for i in range(ARCH["depth"]):
        b = f"blocks.{i}"
        sd.update({f"{b}.attn.qkv.weight": r(3 * D, D), f"{b}.attn.qkv.bias": r(3 * D),
                   f"{b}.attn.proj.weight": r(D, D), f"{b}.attn.proj.bias": r(D),
                   f"{b}.adaLN_modulation.1.weight": r(6 * D, D),
                   f"{b}.adaLN_modulation.1.bias": r(6 * D)})
        if i not in MOE_BLOCKS:
            sd.update(mlp(f"{b}.mlp", F_))
            continue
        sd[f"{b}.mlp.gate_weight"] = r(E, D) * ROUTER_SCALE
        for e in range(E):
            sd.update(mlp(f"{b}.mlp.experts.{e}", F_))
        if n_shared:
            sd.update(mlp(f"{b}.mlp.shared_experts", SHARED_WIDTH * D))
        sd.update({f"{b}.mlp.capacity_predictor.0.weight": r(D, D),
                   f"{b}.mlp.capacity_predictor.0.bias": r(D),
                   f"{b}.mlp.capacity_predictor.2.weight": r(E, D) * 10,
                   f"{b}.mlp.capacity_predictor.2.bias": r(E),
                   f"{b}.mlp.expert_threshold": torch.rand(E, generator=g),
                   f"{b}.mlp.ema_decay": torch.tensor([alpha])})
    return sd


def their_experiment(root, rf=True, n_shared=0, yaml_data=None, **state_kwargs):
    """Their train.py's experiment folder under ``root``; returns (model, ema) state dicts."""
    model = their_state_dict(seed=0, n_shared=n_shared, **state_kwargs)
    ema = their_state_dict(seed=5, n_shared=n_shared, **state_kwargs)
    ckpt = root / CKPT
    ckpt.parent.mkdir(parents=True)
    (root / EXP / YAML_NAME).write_text(yaml.safe_dump(
        yaml_data or their_yaml(rf=rf, n_shared=n_shared), sort_keys=False))
    (root / EXP / "log.txt").write_text("[2025-02-08 10:14:31] train with rectified flow\n")
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param])
    param.sum().backward()
    opt.step()
    torch.save({"model": model, "ema": ema, "opt": opt.state_dict(),
                "args": argparse.Namespace(config=f"config/{YAML_NAME}")}, ckpt)
    return model, ema


# -- a plain functional forward on their tensors ----------------------------------------------

def lin(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def gelu_mlp(sd, prefix, x):
    return lin(sd, f"{prefix}.fc2", F.gelu(lin(sd, f"{prefix}.fc1", x), approximate="tanh"))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def moe_reference(sd, b, x_SD, train: bool):
    scores = torch.softmax(x_SD @ sd[f"{b}.mlp.gate_weight"].t(), dim=-1)
    S = x_SD.shape[0]
    if train:
        counts = [int(S / EXPERTS * CAPACITY)] * EXPERTS
    else:
        h = F.silu(lin(sd, f"{b}.mlp.capacity_predictor.0", x_SD))
        probs = torch.sigmoid(lin(sd, f"{b}.mlp.capacity_predictor.2", h))
        counts = (probs > sd[f"{b}.mlp.expert_threshold"]).sum(0).tolist()
    y = torch.zeros_like(x_SD)
    for e in range(EXPERTS):
        if counts[e] == 0:
            continue
        idx = scores[:, e].topk(counts[e]).indices
        y[idx] += scores[idx, e, None] * gelu_mlp(sd, f"{b}.mlp.experts.{e}", x_SD[idx])
    if f"{b}.mlp.shared_experts.fc1.weight" in sd:
        y = y + gelu_mlp(sd, f"{b}.mlp.shared_experts", x_SD)
    return y


def reference_forward(sd, x, t, y, train: bool):
    D, p, H = ARCH["hidden_size"], ARCH["patch_size"], ARCH["num_heads"]
    B = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freq = TimestepEmbedder.frequencies(t)
    c = lin(sd, "t_embedder.mlp.2", F.silu(lin(sd, "t_embedder.mlp.0", freq)))
    c = c + sd["y_embedder.embedding_table.weight"][y]
    for i in range(ARCH["depth"]):
        b = f"blocks.{i}"
        mods = lin(sd, f"{b}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        a = modulate(F.layer_norm(h, (D,), eps=1e-6), mods[0], mods[1])
        qkv = lin(sd, f"{b}.attn.qkv", a).view(B, -1, 3, H, D // H).permute(2, 0, 3, 1, 4)
        att = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(D // H), -1) @ qkv[2]
        h = h + mods[2][:, None] * lin(sd, f"{b}.attn.proj", att.transpose(1, 2).reshape(B, -1, D))
        m = modulate(F.layer_norm(h, (D,), eps=1e-6), mods[3], mods[4])
        if f"{b}.mlp.gate_weight" in sd:
            out = moe_reference(sd, b, m.reshape(-1, D), train).view_as(m)
        else:
            out = gelu_mlp(sd, f"{b}.mlp", m)
        h = h + mods[5][:, None] * out
    shift, scale = lin(sd, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    h = lin(sd, "final_layer.linear", modulate(F.layer_norm(h, (D,), eps=1e-6), shift, scale))
    g = ARCH["input_size"] // p
    h = h.view(B, g, g, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(B, -1, g * p, g * p)


# -- helpers -----------------------------------------------------------------------------------

def run_cli(argv, capsys):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, [line for line in captured.err.splitlines() if "error:" in line]


def batch(n: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, CHANNELS, ARCH["input_size"], ARCH["input_size"], generator=g)
    return x, torch.rand(n, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture
def timesteps(monkeypatch):
    """Every timestep the model's embedder is given while the test runs."""
    seen: list[torch.Tensor] = []
    forward = TimestepEmbedder.forward

    def recording(self, t):
        seen.append(t.detach().clone())
        return forward(self, t)

    monkeypatch.setattr(TimestepEmbedder, "forward", recording)
    return seen


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL shaped as their SD VAE: 4 latent channels, 8x downsampling."""
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "sd-vae-tiny", levels=4,
                         image_size=IMAGE_SIZE)


@pytest.fixture(params=[0, 1], ids=["no-shared", "shared"])
def imported(request, tmp_path, capsys):
    """Their experiment folder, imported without --config; (their model, their ema, our run)."""
    model, ema = their_experiment(tmp_path, n_shared=request.param)
    rc, out, errors = run_cli(["import-official", tmp_path / CKPT, tmp_path / "out"], capsys)
    assert rc == 0 and not errors, errors
    assert json.loads(out)["checkpoint"].endswith("step_00000000")
    return model, ema, tmp_path / "out"


# -- import: their forward, their buffers, their conventions ----------------------------------

@pytest.mark.numerics
def test_imported_model_reproduces_their_eval_outputs_with_their_thresholds(imported):
    _, theirs, run = imported
    model = load_pretrained(run).model  # ema by default, as their sampler
    assert model.cfg.moe.type == "diffmoe" and model.moe_blocks == list(MOE_BLOCKS)
    x, t, y = batch()
    with torch.no_grad():
        ours = model.eval()(x, t, y, Routing("dynamic"))
        ref = reference_forward(theirs, x, t, y, train=False)
    assert ref.abs().max() > 0.1  # not a trivially zero output
    tokens = x.shape[0] * (ARCH["input_size"] // ARCH["patch_size"]) ** 2
    for layer in ours.layers:
        assert 0 < int(layer.counts_E.sum()) < EXPERTS * tokens  # thresholds bite
    torch.testing.assert_close(ours.prediction, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.numerics
def test_imported_model_makes_their_selections_in_train_mode(imported):
    _, theirs, run = imported
    model = load_pretrained(run).model
    model.y_embedder.dropout = 0.0  # label dropout draws at random in train mode (theirs too)
    x, t, y = batch()
    with torch.no_grad():
        ours = model.train()(x, t, y).prediction
        ref = reference_forward(theirs, x, t, y, train=True)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # The control: eval-mode outputs (other selections) differ from train-mode ones.
    assert (reference_forward(theirs, x, t, y, train=False) - ref).abs().max() > 1e-3


def test_import_takes_ema_for_sampling_and_keeps_their_model_as_raw(imported):
    theirs_model, theirs_ema, run = imported
    ema = load_pretrained(run).model
    raw = load_pretrained(run, weights="raw").model
    for ours, theirs in ((ema, theirs_ema), (raw, theirs_model)):
        for i in MOE_BLOCKS:
            assert torch.equal(ours.blocks[i].mlp.thresholds_E,
                               theirs[f"blocks.{i}.mlp.expert_threshold"])
        torch.testing.assert_close(ours.y_embedder.table.weight,
                                   theirs["y_embedder.embedding_table.weight"])
    assert not torch.equal(ema.y_embedder.table.weight, raw.y_embedder.table.weight)
    state = open_checkpoint(run).state
    assert state["imported_config"].endswith(YAML_NAME)  # found beside the checkpoint


def test_import_reads_moe_config_alpha_and_flow_time_from_their_files(imported):
    _, _, run = imported
    cfg = load_pretrained(run).config
    moe = cfg.model.moe
    assert (moe.num_experts, moe.capacity, moe.interleave) == (EXPERTS, CAPACITY, True)
    assert moe.threshold_ema == ALPHA  # 0.9, not the float32 0.8999999762
    # Their BCE is summed over the MoE layers, ours averaged: the weight scales by their count.
    assert moe.predictor_loss_weight == PREDICTOR_WEIGHT * len(MOE_BLOCKS)
    assert (cfg.objective.type, cfg.objective.time_scale) == ("flow", 1.0)
    assert cfg.model.learn_sigma and cfg.model.class_dropout == 0.1  # their DiT's defaults
    assert moe.shared_experts in (0, SHARED_WIDTH // MLP_RATIO)


def test_flow_import_feeds_t_in_the_unit_interval_when_sampling(imported, timesteps, capsys,
                                                               tmp_path, vae_dir):
    _, _, run = imported
    steps = 4
    rc, _, errors = run_cli(["sample", run, "--num", "2", "--batch-size", "2", "--steps", steps,
                             "--vae", vae_dir, "--out", tmp_path / "grid.png"], capsys)
    assert rc == 0 and not errors, errors
    t = torch.cat(timesteps)
    # Euler from t = 0 (noise) in steps of 1/4, as their RectifiedFlow.sample.
    assert sorted(set(t.tolist())) == [i / steps for i in range(steps)]
    assert np.isfinite(json.loads((tmp_path / "grid.json").read_text())["c_avg_infer"])


def test_ddpm_import_feeds_integer_timesteps_and_guides_three_channels(tmp_path, capsys,
                                                                      timesteps, vae_dir):
    their_experiment(tmp_path, rf=False)
    rc, _, errors = run_cli(["import-official", tmp_path / CKPT, tmp_path / "out"], capsys)
    assert rc == 0 and not errors, errors
    cfg = load_pretrained(tmp_path / "out").config
    assert cfg.objective.type == "ddpm" and cfg.objective.num_timesteps == 1000
    assert cfg.model.learn_sigma and cfg.sample.guidance_channels == 3
    rc, _, errors = run_cli(["sample", tmp_path / "out", "--num", "2", "--batch-size", "2",
                             "--steps", "5", "--cfg-scale", "1.5", "--vae", vae_dir, "--out",
                             tmp_path / "grid.png"], capsys)
    assert rc == 0 and not errors, errors
    t = torch.cat(timesteps)
    assert torch.equal(t, t.round()) and t.max() == 999 and t.min() == 0


def test_eval_on_an_imported_flow_run_needs_no_override(timesteps, capsys, tmp_path):
    # One latent channel, a VAE of one latent channel given at import: eval decodes with it.
    their_experiment(tmp_path, yaml_data=their_yaml(in_channels=1), channels=1)
    run = tmp_path / "out"
    vae = save_tiny_vae(tmp_path / "vae1", latent_channels=1, levels=4, image_size=IMAGE_SIZE)
    assert run_cli(["import-official", tmp_path / CKPT, run, "--vae", vae], capsys)[0] == 0
    rc, out, errors = run_cli(["eval", run, "--num", "4", "--batch-size", "4", "--steps", "2",
                               "--ref", "digits:test:5", "--out", tmp_path / "eval.json",
                               "--no-progress"], capsys)
    assert rc == 0 and not errors, errors
    assert np.isfinite(json.loads(out)["fid"])
    assert torch.cat(timesteps).max() <= 1


def test_import_accepts_a_bare_state_dict_with_their_yaml(tmp_path, capsys):
    theirs = their_state_dict(seed=3, learn_sigma=False)
    torch.save(theirs, tmp_path / "bare.pt")
    (tmp_path / "theirs.yaml").write_text(yaml.safe_dump(their_yaml(learn_sigma=False)))
    rc, _, errors = run_cli(["import-official", tmp_path / "bare.pt", "--config",
                             tmp_path / "theirs.yaml", tmp_path / "out"], capsys)
    assert rc == 0 and not errors, errors
    model = load_pretrained(tmp_path / "out").model
    assert not model.cfg.learn_sigma
    assert torch.equal(model.blocks[1].mlp.thresholds_E, theirs["blocks.1.mlp.expert_threshold"])


# -- import: bad input is one line, and nothing is written -------------------------------------

def moe_config_at_top_level() -> dict:
    data = their_yaml()
    data["MoE_config"] = data["model"]["params"].pop("MoE_config")
    return data


def layers_disagree(sd: dict) -> None:
    sd["blocks.3.mlp.ema_decay"] = torch.tensor([0.5])


def no_ema_decay(sd: dict) -> None:
    for i in MOE_BLOCKS:
        del sd[f"blocks.{i}.mlp.ema_decay"]


@pytest.mark.parametrize("yaml_data, edit, fragment", [
    (moe_config_at_top_level(), None, "has no model.params.MoE_config.{num_experts, capacity, "
     "n_shared_experts, interleave}"),
    (their_yaml(use_swiglu=True), None, "use_swiglu: true"),
    (their_yaml(hiden_size=32), None, "gives model.params.{hiden_size}"),
    ({**their_yaml(), "model": {**their_yaml()["model"], "target": "models.models_ECDiT.DiT"}},
     None, "has model.target 'models.models_ECDiT.DiT'"),
    ({k: v for k, v in their_yaml().items() if k != "basic"}, None, "has no basic section"),
    (None, layers_disagree, "MoE layers with different ema_decay values [0.5, 0.9]"),
    (None, no_ema_decay, "(2 missing, e.g. ['blocks.1.mlp.ema_decay', 'blocks.3.mlp.ema_decay'])"),
], ids=["moe-config-top-level", "swiglu", "unknown-param", "other-target", "no-basic",
        "alpha-differs", "no-ema-decay"])
def test_bad_official_input_is_one_line_and_writes_nothing(tmp_path, capsys, yaml_data, edit,
                                                           fragment):
    their_experiment(tmp_path, yaml_data=yaml_data)
    if edit is not None:
        obj = torch.load(tmp_path / CKPT, weights_only=False)
        edit(obj["model"])
        edit(obj["ema"])
        torch.save(obj, tmp_path / CKPT)
    rc, _, errors = run_cli(["import-official", tmp_path / CKPT, tmp_path / "out"], capsys)
    assert rc == 2 and len(errors) == 1 and fragment in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_the_yaml_must_be_found_beside_the_checkpoint_or_given(tmp_path, capsys):
    their_experiment(tmp_path)
    (tmp_path / EXP / YAML_NAME).rename(tmp_path / "elsewhere.yaml")
    rc, _, errors = run_cli(["import-official", tmp_path / CKPT, tmp_path / "out"], capsys)
    assert rc == 2 and "no YAML in" in errors[0] and "as --config" in errors[0]
    (tmp_path / EXP / "config_a.yaml").write_text("{}")
    (tmp_path / EXP / "config_b.yaml").write_text("{}")
    rc, _, errors = run_cli(["import-official", tmp_path / CKPT, tmp_path / "out"], capsys)
    assert rc == 2 and "holds 2 YAML files (config_a.yaml, config_b.yaml)" in errors[0]
    assert not (tmp_path / "out").exists()
    rc, _, errors = run_cli(["import-official", tmp_path / CKPT, "--config",
                             tmp_path / "elsewhere.yaml", tmp_path / "out"], capsys)
    assert rc == 0 and not errors


def test_import_never_writes_into_a_directory_that_holds_something(tmp_path, capsys):
    their_experiment(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    rc, _, errors = run_cli(["import-official", tmp_path / CKPT, tmp_path / "out"], capsys)
    assert rc == 2 and "already exists and is not empty" in errors[0]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


# -- export: the inverse, and what their code cannot express -----------------------------------

@pytest.mark.numerics
def test_export_writes_their_files_and_imports_back_identically(imported, tmp_path, capsys):
    theirs_model, theirs_ema, run = imported
    shared = any("shared_experts" in k for k in theirs_model)
    rc, out, errors = run_cli(["export-official", run, tmp_path / "exp"], capsys)
    assert rc == 0 and not errors, errors
    written = torch.load(json.loads(out)["checkpoint"], weights_only=True)
    assert json.loads(out)["checkpoint"].endswith("exp/checkpoints/0000000.pt")
    for name, theirs in (("model", theirs_model), ("ema", theirs_ema)):
        assert set(written[name]) == set(theirs)
        for key, value in theirs.items():
            torch.testing.assert_close(written[name][key], value, rtol=0, atol=0, msg=key)
    exported = yaml.safe_load((tmp_path / "exp" / "config.yaml").read_text())
    original = their_yaml(n_shared=int(shared))
    assert exported["basic"]["rf"] is True and exported["model"]["target"] == (
        original["model"]["target"])
    params = exported["model"]["params"]
    for key, value in original["model"]["params"].items():
        if key != "MoE_config":
            assert params[key] == value, key
    moe = params["MoE_config"]
    assert {k: moe[k] for k in ("num_experts", "capacity", "interleave")} == {
        "num_experts": EXPERTS, "capacity": CAPACITY, "interleave": True}
    assert (moe["n_shared_experts"] > 0) == shared
    # Back again, the YAML found beside the checkpoint: the same config and weights.
    rc, _, errors = run_cli(["import-official", json.loads(out)["checkpoint"],
                             tmp_path / "again"], capsys)
    assert rc == 0 and not errors, errors
    first, second = (json.loads((d / "checkpoints/step_00000000/state.json").read_text())
                     for d in (run, tmp_path / "again"))
    assert first["config"] == second["config"]
    for name in ("model", "ema"):
        a, b = (load_file(d / f"checkpoints/step_00000000/{name}.safetensors")
                for d in (run, tmp_path / "again"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def our_run(root, data=THEIR_LATENTS, **moe):
    """A run directory (one checkpoint, untrained weights) of a tiny model of ours, on latents of
    their latent space unless ``data`` says otherwise."""
    cfg = config_from_dict({"model": dict(ARCH, in_channels=CHANNELS, moe={
        "type": "diffmoe", "num_experts": EXPERTS, **moe}), "objective": {"time_scale": 1.0},
        "data": data})
    sd = build_model(cfg.model).state_dict()
    save_checkpoint(root / "checkpoints", 7, {"model": sd, "ema": sd},
                    {"config": cfg.to_dict(), "world_size": 1})
    return root


@pytest.mark.parametrize("moe, fragment", [
    (dict(type="token_choice"), "model.moe.type=token_choice (their "
     "models.models_DiffMoE.DiT routes by DiffMoE's rule; only diffmoe and dense runs can be "
     "exported)"),
    (dict(granularity=2), "model.moe.granularity=2 (fine-grained experts; theirs are all "
     "mlp_ratio·D wide)"),
    (dict(shared_experts=1), "model.moe.shared_experts=1 (their shared expert is one MLP 8·D "
     "wide)"),
    (dict(data={}), "data.name=mnist (their code trains and samples SD-VAE latents; a "
     "pixel-space model is not theirs)"),
    (dict(data=dict(THEIR_LATENTS, scale_factor=0.13025)), "latents scaled by 0.13025, shift 0, "
     "downsampling 8 (their code hard-codes 0.18215, no shift, 8)"),
], ids=["token-choice", "fine-grained", "narrow-shared", "pixels", "other-scale"])
def test_export_refuses_what_their_code_cannot_express(tmp_path, capsys, moe, fragment):
    run = our_run(tmp_path / "run", **moe)
    rc, _, errors = run_cli(["export-official", run, tmp_path / "exp"], capsys)
    assert rc == 2 and len(errors) == 1 and fragment in errors[0], errors
    assert "cannot be written for the authors' code" in errors[0]
    assert not (tmp_path / "exp").exists()


def test_export_of_an_expressible_run_names_its_step_and_refuses_a_full_out(tmp_path, capsys):
    run = our_run(tmp_path / "run", shared_experts=2)
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "keep.txt").write_text("mine")
    rc, _, errors = run_cli(["export-official", run, tmp_path / "exp"], capsys)
    assert rc == 2 and "already exists and is not empty" in errors[0]
    assert [p.name for p in (tmp_path / "exp").iterdir()] == ["keep.txt"]
    rc, out, errors = run_cli(["export-official", run, tmp_path / "exp2"], capsys)
    assert rc == 0 and json.loads(out)["checkpoint"].endswith("checkpoints/0000007.pt")
    assert sorted(p.name for p in (tmp_path / "exp2").iterdir()) == ["checkpoints",
                                                                    "config.yaml"]


def test_a_dense_run_exports_as_their_dit_and_imports_back(tmp_path, capsys):
    run = our_run(tmp_path / "run", type="dense")
    rc, out, errors = run_cli(["export-official", run, tmp_path / "exp"], capsys)
    assert rc == 0 and not errors, errors
    exported = yaml.safe_load((tmp_path / "exp" / "config.yaml").read_text())
    assert exported["model"]["target"] == "models.models_DiT.DiT"
    assert "MoE_config" not in exported["model"]["params"]
    written = torch.load(json.loads(out)["checkpoint"], weights_only=True)["ema"]
    assert not any("gate_weight" in k or "ema_decay" in k for k in written)
    rc, _, errors = run_cli(["import-official", json.loads(out)["checkpoint"],
                             tmp_path / "back"], capsys)
    assert rc == 0 and not errors, errors
    back = load_pretrained(tmp_path / "back")
    model, state = back.model, {"config": back.config.to_dict()}
    first = json.loads((run / "checkpoints/step_00000007/state.json").read_text())["config"]
    assert model.cfg.moe.type == "dense" and state["config"]["objective"] == first["objective"]
    # A dense model's other moe settings set nothing: the rest of the model config round-trips.
    assert ({k: v for k, v in state["config"]["model"].items() if k != "moe"}
            == {k: v for k, v in first["model"].items() if k != "moe"})
    assert state["config"]["data"] == first["data"]


# -- their checkpoints are latent models: decoded by their VAE --------------------------------

def test_an_import_records_their_latent_space_and_samples_images_with_the_vae(
        tmp_path, capsys, vae_dir):
    their_experiment(tmp_path)
    run = tmp_path / "out"
    rc, _, errors = run_cli(["import-official", tmp_path / CKPT, run, "--vae", vae_dir], capsys)
    assert rc == 0 and not errors, errors
    state = {"config": load_pretrained(run).config.to_dict()}
    assert state["config"]["data"] == dict(THEIR_LATENTS, vae=str(vae_dir.resolve()),
                                           **{k: v for k, v in state["config"]["data"].items()
                                              if k not in THEIR_LATENTS and k != "vae"})
    assert state["config"]["model"]["in_channels"] == CHANNELS
    assert state["config"]["model"]["input_size"] == ARCH["input_size"]
    rc, _, errors = run_cli(["sample", run, "--num", "2", "--batch-size", "2", "--steps", "2",
                             "--out", tmp_path / "grid.png"], capsys)
    assert rc == 0 and not errors, errors
    grid = Image.open(tmp_path / "grid.png")
    assert grid.mode == "RGB" and grid.size[1] >= 2 * IMAGE_SIZE  # decoded, upscaled x2
    images = DiffMoEPipeline.from_pretrained(run, device="cpu")(
        class_labels=[3], num_inference_steps=2).images
    assert [(im.mode, im.size) for im in images] == [("RGB", (IMAGE_SIZE, IMAGE_SIZE))]
    # Export keeps the VAE in their basic.vae_path and the latent size in basic.image_size, so
    # importing the export gives the same config.
    rc, out, errors = run_cli(["export-official", run, tmp_path / "exp"], capsys)
    assert rc == 0 and not errors, errors
    basic = yaml.safe_load((tmp_path / "exp" / "config.yaml").read_text())["basic"]
    assert basic["vae_path"] == str(vae_dir.resolve()) and basic["image_size"] == IMAGE_SIZE
    rc, _, errors = run_cli(["import-official", json.loads(out)["checkpoint"],
                             tmp_path / "again"], capsys)
    assert rc == 0 and not errors, errors
    assert load_pretrained(tmp_path / "again").config.to_dict() == state["config"]


def test_sampling_an_import_without_a_vae_says_what_to_pass_and_writes_nothing(
        imported, tmp_path, capsys):
    _, _, run = imported
    rc, _, errors = run_cli(["sample", run, "--num", "2", "--batch-size", "2", "--steps", "1",
                             "--out", tmp_path / "grid.png"], capsys)
    assert rc == 2 and len(errors) == 1 and "names no VAE" in errors[0], errors
    assert "--vae DIR" in errors[0] and "model." not in errors[0]
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "grid.json").exists()


def test_a_vae_that_does_not_fit_their_model_is_refused_at_import(tmp_path, capsys):
    their_experiment(tmp_path)
    shallow = save_tiny_vae(tmp_path / "shallow", levels=2)
    rc, _, errors = run_cli(["import-official", tmp_path / CKPT, tmp_path / "out", "--vae",
                             shallow], capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert "downsamples by 2 but the model's latents come from a VAE that downsamples by 8" in \
        errors[0]
    assert not (tmp_path / "out").exists()


def test_data_advice_for_a_model_with_weights_never_changes_its_architecture(tmp_path):
    cfg = config_from_dict({"model": dict(ARCH, in_channels=CHANNELS),
                            "data": dict(THEIR_LATENTS, path=str(tmp_path))})
    cache = SimpleNamespace(name="latents", image_size=4, channels=CHANNELS,
                            index={"downsampling": THEIR_DOWNSAMPLING})
    with pytest.raises(ConfigError) as fresh:
        check_data_matches_model(cfg, cache)
    assert "set model.input_size=4" in str(fresh.value)  # a new model may take the data's shape
    with pytest.raises(ConfigError) as resumed:
        check_data_matches_model(cfg, cache, resuming=True)
    assert "model." not in str(resumed.value).split(";")[-1]
    assert f"--image-size {IMAGE_SIZE}" in str(resumed.value)
