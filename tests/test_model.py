"""The DiT backbone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from diffmoe.config import ModelConfig, MoEConfig
from diffmoe.diffusion import ObjectiveLoss
from diffmoe.loss import training_loss
from diffmoe.models import build_model
from diffmoe.models.dit import sincos_pos_embed_2d
from diffmoe.models.moe import DenseFFN, DiffMoE, Routing

# Model outputs against references in other shapes and dtypes (make test reruns them on another
# code path).
pytestmark = pytest.mark.numerics


def tiny(**kw) -> ModelConfig:
    moe = kw.pop("moe", MoEConfig(type="diffmoe", num_experts=4))
    base = dict(input_size=8, in_channels=3, patch_size=2, depth=4, hidden_size=32, num_heads=4,
                num_classes=5, moe=moe)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("size, patch, channels, learn_sigma", [
    (8, 2, 3, False), (8, 4, 1, True), (12, 3, 2, False), (6, 6, 4, True), (8, 1, 1, False)])
def test_shapes(size, patch, channels, learn_sigma):
    model = build_model(tiny(input_size=size, patch_size=patch, in_channels=channels,
                             learn_sigma=learn_sigma))
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.rand(2) * 1000, torch.tensor([0, 5]))
    assert out.prediction.shape == (2, channels * (2 if learn_sigma else 1), size, size)


def test_adaln_zero_starts_at_zero_output():
    model = build_model(tiny())
    out = model(torch.randn(3, 3, 8, 8), torch.rand(3) * 1000, torch.tensor([1, 2, 3]))
    assert torch.count_nonzero(out.prediction) == 0


def test_final_conv_starts_as_the_identity_and_learns():
    plain = build_model(tiny(learn_sigma=True))
    conv = build_model(tiny(learn_sigma=True, final_conv=True))
    missing, unexpected = conv.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["final_conv.weight", "final_conv.bias"] and not unexpected
    for m in (plain, conv):  # a trained-looking final layer, so outputs are not all zero
        torch.manual_seed(1)
        torch.nn.init.normal_(m.final_layer.linear.weight, std=0.1)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2) * 1000, torch.tensor([0, 5])
    assert_close(conv(x, t, y).prediction, plain(x, t, y).prediction)
    conv(x, t, y).prediction.square().mean().backward()
    assert conv.final_conv.weight.grad.abs().sum() > 0
    # Each output pixel sees its 3x3 neighbourhood: the first token (the top-left 2x2 patch)
    # reaches one pixel past its patch, into the next patches, and no farther.
    h = torch.zeros(1, 16, 32)
    h[0, 0, 0] = 1.0
    with torch.no_grad():
        conv.final_conv.weight.fill_(1.0)
        conv.final_layer.linear.weight.zero_()
        conv.final_layer.linear.weight[:, 0] = 1.0
        reached = conv.decode(h, torch.zeros(1, 32))[0, 0] != 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:3, :3] = True
    assert torch.equal(reached, expected)


def test_unpatchify_inverts_patch_layout():
    model = build_model(tiny(in_channels=2))
    x = torch.randn(2, 2, 8, 8)
    p, g = 2, 4
    patches = x.view(2, 2, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 2)
    assert torch.equal(model.unpatchify(patches), x)


def test_interleave_places_moe_in_odd_blocks():
    model = build_model(tiny(depth=4))
    kinds = [type(b.mlp) for b in model.blocks]
    assert kinds == [DenseFFN, DiffMoE, DenseFFN, DiffMoE]
    every = build_model(tiny(depth=3, moe=MoEConfig(type="diffmoe", num_experts=4,
                                                    interleave=False)))
    assert all(isinstance(b.mlp, DiffMoE) for b in every.blocks)


def test_outputs_collect_moe_losses():
    model = build_model(tiny()).train()
    for p in model.parameters():  # leave adaLN-Zero so layers see real inputs
        torch.nn.init.normal_(p, std=0.05)
    out = model(torch.randn(2, 3, 8, 8), torch.rand(2) * 1000, torch.tensor([0, 1]))
    assert len(out.layers) == 2
    expected = torch.stack([o.predictor_loss for o in out.layers]).mean()
    assert_close(out.predictor_loss, expected)  # unweighted: the model reads no coefficient
    assert out.aux_loss.item() == 0.0
    # The weights are applied once, where the total is formed.
    moe = dataclasses.replace(model.cfg.moe, predictor_loss_weight=0.25)
    total = training_loss(ObjectiveLoss(torch.tensor(1.0), out), moe)
    assert_close(total.predictor_loss, 0.25 * expected.detach())
    assert_close(total.loss, 1.0 + 0.25 * expected)


def test_label_dropout_uses_null_class():
    model = build_model(tiny(class_dropout=0.999)).train()
    torch.manual_seed(0)
    emb = model.y_embedder(torch.zeros(100, dtype=torch.long)).vector
    null = model.y_embedder.table.weight[5]
    assert (emb == null).all(1).float().mean() > 0.9
    model.eval()
    assert not (model.y_embedder(torch.zeros(4, dtype=torch.long)).vector == null).all(1).any()


def test_pos_embed_is_sincos():
    pe = sincos_pos_embed_2d(16, 4)
    assert pe.shape == (16, 16)
    # Half the channels encode the column (varying fastest), half the row.
    assert (pe[0, :8] == pe[4, :8]).all() and not (pe[0, :8] == pe[1, :8]).all()
    assert (pe[0, 8:] == pe[1, 8:]).all()


def test_every_ffn_variant_runs_in_the_model():
    for kind in ("dense", "token_choice", "expert_choice", "diffmoe"):
        model = build_model(tiny(moe=MoEConfig(type=kind, num_experts=4))).train()
        out = model(torch.randn(2, 3, 8, 8), torch.rand(2) * 1000, torch.tensor([0, 1]))
        out.prediction.sum().backward()
        model.eval()
        mode = "dynamic" if kind == "diffmoe" else "static"
        with torch.no_grad():
            model(torch.randn(2, 3, 8, 8), torch.rand(2) * 1000, torch.tensor([0, 1]),
                  Routing(mode))
