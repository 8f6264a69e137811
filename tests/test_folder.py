"""``data.name: folder``: a generated folder of PNGs trains, samples and is an FID reference;
a metadata.jsonl folder trains a text model; damaged images are skipped and listed; large
folders are converted once, resumably, into a cache keyed by the files and settings; the crop
handles grey, RGB, RGBA, palette and 16-bit images."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmoe import DiffMoEPipeline
from diffmoe.cli import main
from diffmoe.config import load_config
from diffmoe.data import ImageDataset, build_training_dataset
from diffmoe.data.imagefolder import center_crop, folder_channels, folder_modes, list_folder
from diffmoe.errors import DiffMoEError
from diffmoe.evaluation.reference import load_reference, parse_folder_spec

SIDE = 8
TINY = "configs/digits_tiny.yaml"
T2I_TINY = "configs/t2i_shapes_tiny.yaml"
SHORT = ["train.batch_size=8", "train.steps=2", "train.ckpt_every=2", "train.sample_every=2",
         "sample.steps=1", "sample.num=4", "sample.batch_size=4"]


def class_folder(root, per_class=4, grey=False):
    """Two classes of flat-coloured PNGs of mixed sizes (RGB, one RGBA; or all grey) and a
    damaged file in the second class."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate(((220, 40, 40), (40, 40, 220))):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            w, h = 10 + 5 * i, 9 + 3 * (i % 2)
            arr = (np.array(colour) * rng.uniform(0.5, 1, (h, w, 1))).astype(np.uint8)
            image = Image.fromarray(arr)
            if grey:
                image = image.convert("L")
            elif i == 1:
                image = image.convert("RGBA")
            image.save(root / f"class{c}" / f"{i}.png")
    (root / "class1" / "zz_damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def captioned_folder(root):
    root.mkdir(parents=True)
    lines = []
    for i in range(8):
        colour, text = [((230, 30, 30), "a red square"), ((30, 30, 230), "a blue square")][i % 2]
        Image.new("RGB", (12 + i, 10), colour).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def folder_config(root, *extra, config=TINY):
    return load_config(config, ["data.name=folder", f"data.path={root}", "model.in_channels=3",
                                f"model.input_size={SIDE}", "model.num_classes=2", *extra])


def test_class_folder_trains_samples_and_gives_an_fid(tmp_path, caplog, capsys):
    images = class_folder(tmp_path / "images")
    caplog.set_level(logging.WARNING, logger="diffmoe")
    run = tmp_path / "run"
    assert main(["train", TINY, f"train.out_dir={run}", "data.name=folder",
                 f"data.path={images}", "model.in_channels=3", "model.num_classes=2",
                 f"data.cache_dir={tmp_path}/c", *SHORT]) == 0
    # The damaged file is skipped and named in the log, not dropped silently.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 image(s) could not be decoded" in w and "zz_damaged.png" in w
               for w in warnings)
    assert Image.open(run / "samples" / "step_00000002.png").mode == "RGB"
    assert main(["sample", str(run), "--num", "2", "--steps", "1", "--batch-size", "2",
                 "--out", str(tmp_path / "s.png")]) == 0
    capsys.readouterr()
    # The run recorded its class names: the pipeline maps names to labels, also after a save.
    pipe = DiffMoEPipeline.from_pretrained(run, device="cpu")
    assert pipe.id2label == {0: "class0", 1: "class1"} and pipe.get_label_ids(["class1"]) == [1]
    saved = DiffMoEPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "folder"))
    assert saved.id2label == pipe.id2label
    with pytest.raises(DiffMoEError, match="'dogs' is not a class of this model; its classes "
                                           "are \\['class0', 'class1'\\]"):
        pipe.get_label_ids("dogs")
    out = tmp_path / "eval.json"
    args = ["eval", str(run), "--num", "4", "--steps", "1", "--batch-size", "4", "--ref",
            f"folder:{images}:4", "--cache-dir", str(tmp_path / "fid"), "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert math.isfinite(result["fid"]) and result["fid"] >= 0
    assert result["reference"]["source"] == f"folder {images}:4 at {SIDE}x{SIDE}"
    assert result["reference"]["num"] == 4 and not result["reference"]["from_cache"]
    # The damaged file fell among the four chosen; another took its place. Cached for next time.
    again = load_reference(f"folder:{images}:4", 4, tmp_path / "fid", image_size=SIDE)
    assert again.cached and again.cache_file == result["reference"]["cache_file"]
    assert again.stats.num == 4


def test_captioned_folder_trains_a_text_model_and_samples_a_prompt(tmp_path):
    images = captioned_folder(tmp_path / "captioned")
    cfg = folder_config(images, f"data.cache_dir={tmp_path}/c", "model.patch_size=4",
                        config=T2I_TINY)
    ds = build_training_dataset(cfg)
    assert ds.captions == ["a blue square", "a red square"] and len(ds) == 8
    assert ds.prompts(torch.arange(2)) == ["a red square", "a blue square"]
    run = tmp_path / "run"
    assert main(["train", T2I_TINY, f"train.out_dir={run}", "data.name=folder",
                 f"data.path={images}", f"data.cache_dir={tmp_path}/c", f"model.input_size={SIDE}",
                 "model.patch_size=4", *SHORT]) == 0
    assert main(["sample", str(run), "--prompt", "a red square", "--num", "2", "--steps", "1",
                 "--out", str(tmp_path / "t2i.png")]) == 0
    assert Image.open(tmp_path / "t2i.png").mode == "RGB"


def test_crop_composites_alpha_on_white_and_keeps_grey(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((10, 5), (0, 0, 255, 255))
    out = center_crop(rgba, 4)
    assert out.shape == (4, 4, 3) and (out[0, 0] == 255).all()  # white, not black or red
    grey = center_crop(Image.new("LA", (6, 6), (40, 255)), 4, channels=1)
    assert grey.shape == (4, 4, 1) and (grey == 40).all()
    deep = Image.fromarray(np.full((6, 6), 40000, dtype=np.uint16))  # 16-bit grey
    assert deep.mode.startswith("I") and (center_crop(deep, 4, 1) == 40000 >> 8).all()
    palette = Image.new("RGB", (6, 6), (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert (center_crop(palette, 4)[..., 1] == 200).all()
    # Modes from the headers: grey only when every image is grey.
    for name, image in (("a.png", Image.new("L", (5, 5))), ("b.png", Image.new("RGB", (5, 5)))):
        (tmp_path / "x").mkdir(exist_ok=True)
        image.save(tmp_path / "x" / name)
    modes = folder_modes(list_folder(tmp_path))
    assert modes == ["L", "RGB"] and folder_channels(modes) == 3 and folder_channels(["L"]) == 1


def test_grey_folder_trains_a_one_channel_model(tmp_path):
    images = class_folder(tmp_path / "grey", grey=True)
    ds = build_training_dataset(folder_config(images, "model.in_channels=1"))
    assert ds.channels == 1 and ds.image_size == SIDE and len(ds) == 8
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 and ds.num_classes == 2


def test_flips_are_random_per_image_and_follow_the_generator():
    images = torch.arange(4 * 2 * 3, dtype=torch.uint8).view(4, 1, 2, 3).repeat(16, 1, 1, 1)
    ds = ImageDataset(images, torch.zeros(64, dtype=torch.int64), 1, "toy", flip=True)
    idx = torch.arange(64)
    x, _ = ds.batch(idx, torch.Generator().manual_seed(3))
    again, _ = ds.batch(idx, torch.Generator().manual_seed(3))
    plain = ImageDataset(images, ds.labels, 1, "toy").batch(idx)[0]
    mirrored = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(x, plain)])
    kept = torch.tensor([torch.equal(a, b) for a, b in zip(x, plain)])
    assert torch.equal(x, again) and (mirrored ^ kept).all()
    assert 10 < int(mirrored.sum()) < 54


def _open(images, cache, **kw):
    extra = [f"data.{k}={v}" for k, v in kw.items()]
    return build_training_dataset(folder_config(images, f"data.cache_dir={cache}", *extra))


def test_large_folder_is_cached_once_resumably_and_never_stale(tmp_path, monkeypatch):
    import diffmoe.data.folder as folder

    images = class_folder(tmp_path / "images", per_class=5)
    memory = _open(images, tmp_path / "c0")
    assert not (tmp_path / "c0").exists()  # small: held in memory, no cache written
    monkeypatch.setattr(folder, "CHUNK", 4)
    original, written = folder.atomic_write, []

    def dies_after_first_chunk(path, *args, **kwargs):
        if path.name.startswith("chunk_"):
            written.append(path.name)
            if len(written) == 2:
                raise KeyboardInterrupt  # killed while recording the second chunk
        return original(path, *args, **kwargs)

    monkeypatch.setattr(folder, "atomic_write", dies_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        _open(images, tmp_path / "c", in_memory_mb=0)
    (where,) = (tmp_path / "c").iterdir()
    assert sorted(p.name for p in where.glob("chunk_*")) == ["chunk_00000.json"]
    written.clear()
    monkeypatch.setattr(folder, "atomic_write",
                        lambda path, *a, **k: written.append(path.name) or original(path, *a, **k))
    cached = _open(images, tmp_path / "c", in_memory_mb=0, workers=2)
    assert [n for n in written if n.startswith("chunk_")] == ["chunk_00001.json",
                                                             "chunk_00002.json"]
    assert torch.equal(cached.images[torch.arange(len(cached))], memory.images)
    assert torch.equal(cached.labels, memory.labels) and len(cached) == 10
    assert "zz_damaged.png" in (where / "skipped.txt").read_text()
    # Opened again: read from the finished cache, nothing decoded.
    written.clear()
    assert torch.equal(_open(images, tmp_path / "c", in_memory_mb=0).images[[0, 9]],
                       memory.images[[0, 9]])
    assert written == []
    # A changed file or a changed setting gives a new cache, never the old one.
    first = images / "class0" / "0.png"
    Image.new("RGB", (10, 9), (0, 255, 0)).save(first)
    os.utime(first, ns=(1, 1))
    changed = _open(images, tmp_path / "c", in_memory_mb=0)
    assert len(list((tmp_path / "c").iterdir())) == 2
    assert (changed.images[[0]][0, 1] == 255).all()
    cfg = folder_config(images, f"data.cache_dir={tmp_path}/c", "data.in_memory_mb=0",
                        "model.input_size=4")
    assert build_training_dataset(cfg).image_size == 4
    assert len(list((tmp_path / "c").iterdir())) == 3


def test_folder_reference_spec():
    assert parse_folder_spec("folder:/data/x:12", 5) == (Path("/data/x"), 12)
    assert parse_folder_spec("folder:/data/a:b", 5)[0].name == "a:b"
    assert parse_folder_spec("folder:rel", 7)[1] == 7


def test_the_example_config_trains_on_a_folder(tmp_path):
    """configs/folder_example.yaml as README "Train on your own images" runs it, shortened."""
    images = class_folder(tmp_path / "my_images")
    run = tmp_path / "mine"
    assert main(["train", "configs/folder_example.yaml", f"data.path={images}",
                 "model.num_classes=2", f"train.out_dir={run}", *SHORT]) == 0
    assert json.loads((run / "checkpoints" / "step_00000002" / "state.json").read_text())[
        "config"]["data"]["flip"] is True
    assert main(["sample", str(run), "--num", "2", "--steps", "1", "--batch-size", "2",
                 "--out", str(tmp_path / "mine.png")]) == 0
    assert Image.open(tmp_path / "mine.png").mode == "RGB"
