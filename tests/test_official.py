"""import-official: a state dict written in the authors' layout (by the code below, which follows
the key list of their public DiT/DiffMoE code, not by our exporter) is converted, and our model
then reproduces a plain functional forward computed from *their* tensors: the same outputs in
eval mode with their thresholds, and the same selections (hence outputs) in train mode."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from diffmoe.cli import main
from diffmoe.models.dit import TimestepEmbedder, sincos_pos_embed_2d
from diffmoe.models.moe import Routing
from diffmoe.sample import load_model

ARCH = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=10)
MOE = dict(num_experts=4, capacity=1.0, n_shared_experts=0, interleave=True)
CHANNELS = 4
MLP_RATIO = 4
SCALE = 0.2  # std of the random tensors


def their_state_dict(seed: int = 0, learn_sigma: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors under the authors' key names and shapes (nn.Linear: (out, in))."""
    g = torch.Generator().manual_seed(seed)
    D, p, E = ARCH["hidden_size"], ARCH["patch_size"], MOE["num_experts"]
    F_ = MLP_RATIO * D
    out_ch = CHANNELS * (2 if learn_sigma else 1)

    def r(*shape):
        return torch.randn(*shape, generator=g) * SCALE

    sd = {"x_embedder.proj.weight": r(D, CHANNELS, p, p), "x_embedder.proj.bias": r(D),
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
        if i % 2 == 1:  # MoE in odd blocks (interleave)
            sd[f"{b}.mlp.gate_weight"] = r(E, D) * 10
            for e in range(E):
                sd.update({f"{b}.mlp.experts.{e}.fc1.weight": r(F_, D),
                           f"{b}.mlp.experts.{e}.fc1.bias": r(F_),
                           f"{b}.mlp.experts.{e}.fc2.weight": r(D, F_),
                           f"{b}.mlp.experts.{e}.fc2.bias": r(D)})
            sd.update({f"{b}.mlp.capacity_predictor.0.weight": r(D, D),
                       f"{b}.mlp.capacity_predictor.0.bias": r(D),
                       f"{b}.mlp.capacity_predictor.2.weight": r(E, D) * 10,
                       f"{b}.mlp.capacity_predictor.2.bias": r(E),
                       f"{b}.mlp.expert_threshold": torch.rand(E, generator=g)})
        else:
            sd.update({f"{b}.mlp.fc1.weight": r(F_, D), f"{b}.mlp.fc1.bias": r(F_),
                       f"{b}.mlp.fc2.weight": r(D, F_), f"{b}.mlp.fc2.bias": r(D)})
    return sd


# -- a plain functional forward on their tensors ----------------------------------------------

def lin(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def moe_reference(sd, b, x_SD, train: bool):
    E = MOE["num_experts"]
    scores = torch.softmax(x_SD @ sd[f"{b}.mlp.gate_weight"].t(), dim=-1)
    S = x_SD.shape[0]
    if train:
        counts = [int(S * MOE["capacity"] / E)] * E
    else:
        h = F.silu(lin(sd, f"{b}.mlp.capacity_predictor.0", x_SD))
        probs = torch.sigmoid(lin(sd, f"{b}.mlp.capacity_predictor.2", h))
        counts = (probs > sd[f"{b}.mlp.expert_threshold"]).sum(0).tolist()
    y = torch.zeros_like(x_SD)
    for e in range(E):
        if counts[e] == 0:
            continue
        idx = scores[:, e].topk(counts[e]).indices
        h = F.gelu(lin(sd, f"{b}.mlp.experts.{e}.fc1", x_SD[idx]), approximate="tanh")
        y[idx] += scores[idx, e, None] * lin(sd, f"{b}.mlp.experts.{e}.fc2", h)
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
            out = lin(sd, f"{b}.mlp.fc2", F.gelu(lin(sd, f"{b}.mlp.fc1", m), approximate="tanh"))
        h = h + mods[5][:, None] * out
    shift, scale = lin(sd, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    h = lin(sd, "final_layer.linear", modulate(F.layer_norm(h, (D,), eps=1e-6), shift, scale))
    g = ARCH["input_size"] // p
    h = h.view(B, g, g, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(B, -1, g * p, g * p)


# -- the tests -------------------------------------------------------------------------------

@pytest.fixture
def imported(tmp_path):
    theirs = their_state_dict()
    torch.save({"model": theirs, "ema": theirs, "opt": {"state": {}}}, tmp_path / "theirs.pt")
    (tmp_path / "theirs.yaml").write_text(yaml.safe_dump(
        {"model": {"params": dict(ARCH, class_dropout_prob=0.0)}, "MoE_config": MOE}))
    rc = main(["import-official", str(tmp_path / "theirs.pt"), "--config",
               str(tmp_path / "theirs.yaml"), str(tmp_path / "out")])
    assert rc == 0
    model, _, _ = load_model(tmp_path / "out")
    return theirs, model


def batch(n: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, CHANNELS, ARCH["input_size"], ARCH["input_size"], generator=g)
    return x, torch.rand(n, generator=g) * 1000, torch.randint(0, 10, (n,), generator=g)


def test_imported_model_reproduces_their_eval_outputs_with_their_thresholds(imported):
    theirs, model = imported
    assert model.cfg.learn_sigma and model.cfg.in_channels == CHANNELS
    assert model.cfg.moe.type == "diffmoe" and model.moe_blocks == [1]
    x, t, y = batch()
    with torch.no_grad():
        ours = model.eval()(x, t, y, Routing("dynamic")).prediction
        ref = reference_forward(theirs, x, t, y, train=False)
        counts = model(x, t, y, Routing("dynamic")).layers[0].counts_E
    assert ref.abs().max() > 0.1  # not a trivially zero output
    assert 0 < int(counts.sum()) < MOE["num_experts"] * x.shape[0] * 16  # thresholds bite
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_imported_model_makes_their_selections_in_train_mode(imported):
    theirs, model = imported
    x, t, y = batch()
    with torch.no_grad():
        ours = model.train()(x, t, y).prediction
        ref = reference_forward(theirs, x, t, y, train=True)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # The control: eval-mode outputs (other selections) differ from train-mode ones.
    assert (reference_forward(theirs, x, t, y, train=False) - ref).abs().max() > 1e-3


def test_import_accepts_a_bare_state_dict_and_samples(tmp_path):
    theirs = their_state_dict(seed=3, learn_sigma=False)
    torch.save(theirs, tmp_path / "bare.pt")
    (tmp_path / "theirs.yaml").write_text(yaml.safe_dump(
        {"model": {"params": ARCH}, "MoE_config": MOE}))
    assert main(["import-official", str(tmp_path / "bare.pt"), "--config",
                 str(tmp_path / "theirs.yaml"), str(tmp_path / "out"),
                 "objective.time_scale=1"]) == 0
    model, state, _ = load_model(tmp_path / "out")
    assert not model.cfg.learn_sigma and state["config"]["objective"]["time_scale"] == 1
    tau = model.blocks[1].mlp.thresholds_E
    assert torch.equal(tau, theirs["blocks.1.mlp.expert_threshold"])
    assert main(["sample", str(tmp_path / "out"), "--num", "4", "--steps", "1", "--batch-size",
                 "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert json.loads((tmp_path / "grid.json").read_text())["step"] == 0
    assert np.isfinite(json.loads((tmp_path / "grid.json").read_text())["c_avg_infer"])
