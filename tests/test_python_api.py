"""The Python API (docs/python-api.md): routing defaults, the Hub-style folder, the pipeline
against ``diffmoe sample``, the drop-in layers, bad input, and the examples."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file

import diffmoe
from diffmoe import DiffMoELayer, DiffMoEPipeline, ExpertChoiceLayer, Routing, TokenChoiceLayer
from diffmoe.cli import main as cli_main
from diffmoe.config import ModelConfig, MoEConfig, load_config
from diffmoe.diffusion import FlowMatching, sample
from diffmoe.errors import DiffMoEError
from diffmoe.hub import CONFIG_FILE, WEIGHTS_FILE, Pretrained, load_pretrained
from diffmoe.images import GRID_PAD
from diffmoe.models import build_model
from diffmoe.models.moe import apply_threshold_updates, diffmoe_layers

ROOT = Path(__file__).resolve().parents[1]
LABELS = [0, 1, 2, 3]
STEPS = 2
UPSCALE = 2  # diffmoe sample's grid upscale


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(train_tiny) -> Path:
    return train_tiny()


def _tiny_diffmoe(thresholds: float):
    cfg = ModelConfig(input_size=4, in_channels=1, patch_size=2, depth=2, hidden_size=16,
                      num_heads=2, num_classes=3, moe=MoEConfig(type="diffmoe", num_experts=2))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for layer in diffmoe_layers(model):
        layer.thresholds_E.fill_(thresholds)
    return model


def test_eval_forwards_and_sampling_default_to_dynamic_routing_for_diffmoe():
    model = _tiny_diffmoe(1.0)  # no prediction exceeds 1: dynamic routes nothing, static k
    x, t, y = torch.randn(2, 1, 4, 4), torch.rand(2) * 1000, torch.tensor([0, 1])
    with torch.no_grad():
        default = model(x, t, y).layers[0].counts_E
        dynamic = model(x, t, y, Routing("dynamic")).layers[0].counts_E
        static = model(x, t, y, Routing("static")).layers[0].counts_E
    assert default.tolist() == dynamic.tolist() == [0, 0] and static.tolist() == [4, 4]
    counts = []
    sample(model, FlowMatching(1), y, sampler="euler", steps=1,
           on_forward=lambda _, out: counts.append(out.layers[0].counts_E.tolist()))
    assert counts == [[0, 0]]
    assert build_model(replace(model.cfg, moe=MoEConfig())).default_routing.mode == "static"


def test_training_forwards_use_the_training_rule_whatever_the_routing():
    model = _tiny_diffmoe(1.0).train()
    x, t, y = torch.randn(2, 1, 4, 4), torch.rand(2) * 1000, torch.tensor([0, 1])
    assert model(x, t, y).layers[0].counts_E.tolist() == [4, 4]


def test_save_then_load_gives_the_same_images_bitwise(run, tmp_path):
    pipe = DiffMoEPipeline.from_pretrained(run, device="cpu")
    first = pipe(class_labels=LABELS, num_inference_steps=STEPS, generator=3, output_type="pt")
    folder = pipe.save_pretrained(tmp_path / "folder")
    assert {p.name for p in folder.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, "README.md"}
    again = DiffMoEPipeline.from_pretrained(folder, device="cpu")
    second = again(class_labels=LABELS, num_inference_steps=STEPS, generator=3,
                   output_type="pt")
    assert torch.equal(first.images, second.images)
    assert first.capacity == second.capacity and again.pretrained.step == pipe.pretrained.step
    # EMA weights by default, thresholds included; the config as trained.
    saved = load_file(str(folder / WEIGHTS_FILE))
    ema = load_file(str(pipe.pretrained.source / "ema.safetensors"))
    assert saved.keys() == ema.keys() and any(k.endswith("thresholds_E") for k in saved)
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    # The config as trained, less the machine's paths (the run directory); readable by all.
    recorded = json.loads((folder / CONFIG_FILE).read_text())
    trained = pipe.config.to_dict()
    assert trained["train"].pop("out_dir") == str(pipe.pretrained.source.parent.parent)
    assert recorded["train"].pop("out_dir") == "runs/default" and recorded == trained
    umask = os.umask(0)
    os.umask(umask)
    assert {(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {0o666 & ~umask}
    card = (folder / "README.md").read_text()
    assert f"| training steps | {pipe.pretrained.step} |" in card
    assert f"{first.capacity.c_avg_infer:.4f}, mode dynamic" in card


def _grid_tiles(png: Path, count: int, size: int) -> list[np.ndarray]:
    """The tiles of a ``diffmoe sample`` grid (square layout, GRID_PAD, upscaled)."""
    grid = np.array(Image.open(png))
    nrow = math.ceil(math.sqrt(count))
    tiles = []
    for i in range(count):
        r, c = divmod(i, nrow)
        top, left = GRID_PAD + r * (size + GRID_PAD), GRID_PAD + c * (size + GRID_PAD)
        tiles.append(grid[top * UPSCALE:(top + size) * UPSCALE:UPSCALE,
                          left * UPSCALE:(left + size) * UPSCALE:UPSCALE])
    return tiles


@pytest.mark.parametrize("mode", ["dynamic", "threshold"])
def test_pipeline_images_equal_diffmoe_sample(run, tmp_path, capsys, mode):
    png = tmp_path / "cli.png"
    assert cli_main(["sample", str(run), "--num", str(len(LABELS)), "--steps", str(STEPS),
                     "--seed", "5", "--cfg-scale", "2", "--mode", mode, "--out", str(png),
                     "--device", "cpu"]) == 0
    summary = json.loads(png.with_suffix(".json").read_text())
    pipe = DiffMoEPipeline.from_pretrained(run, device="cpu")
    out = pipe(class_labels=LABELS, num_inference_steps=STEPS, guidance_scale=2.0, mode=mode,
               generator=5)
    size = pipe.config.model.input_size
    # The same batches, seeds and threads as the command: the same computation, so bitwise.
    for tile, image in zip(_grid_tiles(png, len(LABELS), size), out.images, strict=True):
        assert np.array_equal(tile, np.array(image))
    assert out.capacity.c_avg_infer == summary["c_avg_infer"]
    assert out.capacity.per_layer == summary["capacity_per_layer"]
    assert out.capacity.activated_params == summary["activated_params"]
    assert out.capacity.mode == summary["settings"]["mode"] == mode


def test_pipeline_defaults_are_the_models_sample_settings(run):
    pipe = DiffMoEPipeline.from_pretrained(run, device="cpu")
    out = pipe(class_labels=[1], generator=torch.Generator().manual_seed(0))
    assert out.settings.steps == pipe.config.sample.steps and out.capacity.mode == "dynamic"
    assert len(out.capacity.per_step) == pipe.config.sample.steps
    assert isinstance(out.images[0], Image.Image)


def _text_pipeline(tmp_path: Path) -> DiffMoEPipeline:
    cfg = load_config(ROOT / "configs" / "t2i_shapes_tiny.yaml")
    model = build_model(cfg.model).eval()
    return DiffMoEPipeline(Pretrained(model, cfg, 0, "ema", tmp_path))


def test_text_model_takes_prompts(tmp_path):
    pipe = _text_pipeline(tmp_path)
    out = pipe(prompt=["a red circle", "two blue squares"], num_inference_steps=1,
               num_images_per_prompt=2, output_type="pt")
    size = pipe.config.model.input_size
    assert out.images.shape == (4, pipe.config.model.in_channels, size, size)
    assert 0.0 <= float(out.images.min()) and float(out.images.max()) <= 1.0


def _write_folder(run: Path, tmp_path: Path) -> Path:
    return load_pretrained(run).save_pretrained(tmp_path / "folder")


def _edit_config(folder: Path, edit) -> None:
    data = json.loads((folder / CONFIG_FILE).read_text())
    edit(data)
    (folder / CONFIG_FILE).write_text(json.dumps(data))


@pytest.mark.parametrize("damage, expected", [
    (lambda f: (f / CONFIG_FILE).unlink(), "has model.safetensors but no config.json"),
    (lambda f: (f / WEIGHTS_FILE).unlink(), "has config.json but no model.safetensors"),
    (lambda f: _edit_config(f, lambda d: d["model"].update(depth=3)),
     "does not fit its config.json"),
    (lambda f: _edit_config(f, lambda d: d["model"].update(rope=True)),
     "has config field 'model.rope' that diffmoe"),
    (lambda f: (f / CONFIG_FILE).write_text("{not json"), "cannot be read as JSON"),
])
def test_a_bad_folder_is_one_error_line(run, tmp_path, damage, expected):
    folder = _write_folder(run, tmp_path)
    damage(folder)
    with pytest.raises(DiffMoEError, match=expected) as err:
        DiffMoEPipeline.from_pretrained(folder, device="cpu")
    assert "\n" not in str(err.value)


def test_a_missing_path_names_what_to_pass(tmp_path):
    with pytest.raises(DiffMoEError, match="snapshot_download"):
        load_pretrained("someone/diffmoe-model")
    with pytest.raises(DiffMoEError, match="is not a folder written by save_pretrained"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("call, expected", [
    (dict(class_labels=[10]), "class label 10 is outside 0..9"),
    (dict(class_labels=[-1]), "class label -1 is outside 0..9"),
    (dict(class_labels=[0.5]), "must be one or more integers"),
    (dict(class_labels=[]), "must be one or more integers in 0..9, got none"),
    (dict(), "say what to draw with class_labels"),
    (dict(prompt=["a red circle"]), "class-conditional and takes no prompt"),
    (dict(class_labels=[0], mode="fast"), "mode='fast' is not one of"),
    (dict(class_labels=[0], sampler="ddim"), "not available for objective.type=flow"),
    (dict(class_labels=[0], output_type="numpy"), "output_type 'numpy' is not one of"),
    (dict(class_labels=[0], output_type="latent"), "output_type='latent' is for latent models"),
    (dict(class_labels=[0], generator="seed"), "generator must be a seed"),
    (dict(class_labels=[0], num_images_per_prompt=0), "must be a positive integer"),
])
def test_bad_calls_are_refused_before_sampling(run, call, expected):
    pipe = DiffMoEPipeline.from_pretrained(run, device="cpu")
    with pytest.raises(DiffMoEError, match=expected) as err:
        pipe(**call)
    assert "\n" not in str(err.value) and pipe.last is None  # nothing was sampled


def test_text_model_refuses_class_labels(tmp_path):
    with pytest.raises(DiffMoEError, match="text-to-image and has no class labels"):
        _text_pipeline(tmp_path)(class_labels=[0])
    with pytest.raises(DiffMoEError, match="say what to draw with prompt"):
        _text_pipeline(tmp_path)()


def test_saving_where_it_cannot_writes_nothing(run, tmp_path):
    pipe = DiffMoEPipeline.from_pretrained(run, device="cpu")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target, expected in ((blocker, "is a file"), (run, "is a run or checkpoint")):
        before = sorted(p.name for p in tmp_path.rglob("*")) + sorted(
            p.name for p in run.rglob("*"))
        with pytest.raises(DiffMoEError, match=expected):
            pipe.save_pretrained(target)
        after = sorted(p.name for p in tmp_path.rglob("*")) + sorted(
            p.name for p in run.rglob("*"))
        assert before == after


def test_raw_weights_come_from_the_run_not_from_a_folder(run, tmp_path):
    folder = _write_folder(run, tmp_path)
    with pytest.raises(DiffMoEError, match="holds the ema weights only, not raw"):
        load_pretrained(folder, weights="raw")
    raw = load_pretrained(run, weights="raw").model.state_dict()
    stored = load_file(str(load_pretrained(run).source / "model.safetensors"))
    assert all(torch.equal(raw[k], stored[k]) for k in stored)


@pytest.mark.parametrize("layer_cls", [DiffMoELayer, TokenChoiceLayer, ExpertChoiceLayer])
def test_drop_in_layers_equal_the_layer_they_wrap(layer_cls):
    torch.manual_seed(0)
    layer = layer_cls(16, 64, num_experts=4, capacity=1.0 if layer_cls is not TokenChoiceLayer
                      else 2.0)
    x = torch.randn(2, 8, 16)
    out = layer(x)
    inner = layer.layer(x, layer.default_routing)
    assert torch.equal(out.output, inner.y) and out.output.shape == x.shape
    assert float(out.capacity) == pytest.approx(1.0 if layer_cls is not TokenChoiceLayer else 2.0)
    if layer_cls is TokenChoiceLayer:
        assert out.aux_loss > 0
    if layer_cls is DiffMoELayer:
        assert out.predictor_loss > 0 and out.threshold_targets.shape == (4,)
        assert diffmoe_layers(layer) == [layer.layer]


def test_drop_in_layer_refuses_bad_arguments():
    with pytest.raises(DiffMoEError, match="model.moe.num_experts=0"):
        DiffMoELayer(16, 64, num_experts=0)
    with pytest.raises(DiffMoEError, match="takes \\(batch, tokens, dim\\) input"):
        DiffMoELayer(16, 64, num_experts=2)(torch.randn(8, 16))


def test_drop_in_example_trains_and_samples_dynamically():
    result = _example("drop_in_layer").main(["--steps", "5"])
    assert math.isfinite(result["loss"])
    assert all(t > 0 for t in result["thresholds"])  # moved from 0 by Eq. 17 after each step
    # Dynamic: k_e from the thresholds, not the training rule's S*C/E tokens per expert.
    rule = 8 * 16 // 4
    assert result["tokens_per_expert"] != [rule] * 4
    assert result["capacity"] == pytest.approx(sum(result["tokens_per_expert"]) / (8 * 16))


def test_pipeline_example_runs_on_a_tiny_run(run, tmp_path):
    result = _example("pipeline_quickstart").main([str(run), str(tmp_path / "out"),
                                                   "--steps", str(STEPS)])
    assert result["same_images_after_reload"] and result["mode"] == "dynamic"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        f"class_{i}.png" for i in range(4)]


def test_top_level_exports_resolve():
    for name in diffmoe.__all__:
        assert getattr(diffmoe, name) is not None
    with pytest.raises(AttributeError):
        diffmoe.not_a_name  # noqa: B018


def test_timm_block_example_trains_and_samples_dynamically():
    """examples/timm_block.py: DiffMoEMlp as the mlp_layer of a timm-style Block in an
    nn.Sequential, trained with moe_losses/update_thresholds, sampled under routing()."""
    result = _example("timm_block").main(["--steps", "5"])
    assert math.isfinite(result["loss"]) and result["loss"] > result["task_loss"]
    assert result["output_shape"] == [8, 16, 32]
    assert all(t > 0 for layer in result["thresholds"] for t in layer)  # Eq. 17 moved them
    rule = 8 * 16 // 4  # the training rule's S·C/E tokens per expert, what static routing takes
    assert result["static_tokens_per_expert"] == [[rule] * 4] * 2
    assert result["dynamic_tokens_per_expert"] != result["static_tokens_per_expert"]


def _mlp_stack(**options) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(diffmoe.DiffMoEMlp(16, 64, num_experts=4, **options),
                         diffmoe.DiffMoEMlp(16, 64, num_experts=4, **options))


def test_drop_in_mlp_is_the_layer_returning_a_tensor():
    torch.manual_seed(0)
    layer = DiffMoELayer(16, 64, num_experts=4)
    torch.manual_seed(0)
    mlp = diffmoe.DiffMoEMlp(in_features=16, hidden_features=64, act_layer=nn.GELU,
                             num_experts=4)
    x = torch.randn(2, 8, 16)
    assert torch.equal(mlp(x), layer(x).output)  # the same computation
    assert torch.equal(mlp.last.predictor_loss, layer.last.predictor_loss)


def test_moe_losses_weigh_and_average_the_layers_as_training_does():
    model = _mlp_stack(predictor_loss_weight=0.5)
    model(torch.randn(2, 8, 16))
    layers = [m.last for m in model]
    expected = 0.5 * torch.stack([o.predictor_loss for o in layers]).mean()
    total = diffmoe.moe_losses(model)
    torch.testing.assert_close(total, expected)
    total.backward()  # the predictor learns from it
    assert all(m.layer.predictor.parameters().__next__().grad is not None for m in model)


def test_update_thresholds_applies_eq17_once_per_training_forward():
    model = _mlp_stack()
    model(torch.randn(2, 8, 16))
    targets = [m.last.threshold_targets.clone() for m in model]
    reference = _mlp_stack()
    apply_threshold_updates(diffmoe_layers(reference), targets)
    diffmoe.update_thresholds(model)
    for ours, theirs in zip(diffmoe_layers(model), diffmoe_layers(reference)):
        assert torch.equal(ours.thresholds_E, theirs.thresholds_E)
    with pytest.raises(DiffMoEError, match="2 of 2 DiffMoE layers have no threshold targets"):
        diffmoe.update_thresholds(model)  # the targets were used


def test_routing_sets_every_layer_and_restores_it():
    model = _mlp_stack().eval()
    x = torch.randn(2, 8, 16)
    with diffmoe.routing(model, "threshold", threshold=1.0):
        model(x)
        assert [m.last.details.counts_E.sum().item() for m in model] == [0, 0]  # γ = 1: none
    assert all(m.routing is None for m in model)
    with diffmoe.routing(model, "static"):
        model(x)
        assert [m.last.details.counts_E.tolist() for m in model] == [[4, 4, 4, 4]] * 2
    with pytest.raises(DiffMoEError, match="routing mode 'fast' is not one of"):
        with diffmoe.routing(model, "fast"):
            pass
    with pytest.raises(DiffMoEError, match="needs DiffMoE's capacity predictor"):
        with diffmoe.routing(TokenChoiceLayer(16, 64, num_experts=2), "dynamic"):
            pass
    with pytest.raises(DiffMoEError, match="found no DiffMoELayer"):
        diffmoe.moe_losses(nn.Linear(2, 2))


@pytest.mark.parametrize("options, expected", [
    (dict(act_layer=nn.ReLU), "does not take act_layer=ReLU"),
    (dict(drop=0.1), "does not take drop=0.1"),
    (dict(bias=False), "does not take bias=False"),
    (dict(out_features=8), "out_features=8 differs from in_features=16"),
])
def test_drop_in_mlp_refuses_what_its_experts_cannot_do(options, expected):
    with pytest.raises(DiffMoEError, match=expected):
        diffmoe.DiffMoEMlp(16, 64, num_experts=2, **options)


def test_train_from_python_takes_a_path_and_overrides(tmp_path):
    import diffmoe.train  # noqa: F401  (the submodule import keeps diffmoe.train callable)

    result = diffmoe.train(ROOT / "configs" / "digits_tiny.yaml",
                           **{"train.out_dir": str(tmp_path / "run"), "train.steps": 2,
                              "train.ckpt_every": 2, "train.sample_every": 2},
                           sample={"steps": 1, "num": 4, "batch_size": 4})
    assert result.step == 2
    assert load_pretrained(result.run_dir).config.sample.steps == 1
    with pytest.raises(DiffMoEError, match="config must be a Config, a YAML path or a dict"):
        diffmoe.train(3)


def test_dir_shows_the_public_names_only():
    assert dir(diffmoe) == diffmoe.__all__
    assert not {"Any", "TYPE_CHECKING", "importlib"} & set(dir(diffmoe))


def test_checkpoint_weights_are_readable_as_the_rest_of_the_run(run):
    """Weights are written with the mode every other file gets (umask applied), not 0600."""
    checkpoint = load_pretrained(run).source
    modes = {p.name: p.stat().st_mode & 0o777 for p in checkpoint.iterdir()}
    assert set(modes.values()) == {modes["state.json"]}, modes
