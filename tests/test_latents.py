"""Latent caches with a tiny randomly initialised AutoencoderKL and a few generated images:
ADM crop, image + flip encoding, undecodable images skipped and listed, resumption after a
killed run, training on the cache and decoding samples with the same VAE."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vae import save_tiny_vae

from diffmoe import DiffMoEPipeline
from diffmoe.cli import main
from diffmoe.config import load_config
from diffmoe.errors import ConfigError, DataError
from diffmoe.hub import Pretrained, load_pretrained
from diffmoe.models import build_model
from diffmoe.data.imagefolder import center_crop, load_image
from diffmoe.data.latents import LatentDataset, encode_batch, load_vae

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16
CLASSES = ("ant", "bee", "cat")
PER_CLASS = 3


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae", image_size=IMAGE_SIZE)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(PER_CLASS):
            size = (24 + 4 * i, 20)  # landscape, odd sizes: the crop has work to do
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(
                root / c / f"{i}.png")
    (root / "bee" / "broken.jpg").write_bytes(b"not an image")
    return root


def cache(images, out, vae_dir, *extra):
    return main(["cache-latents", str(images), str(out), "--vae", str(vae_dir), "--image-size",
                 str(IMAGE_SIZE), "--shard-size", "4", "--batch-size", "3", "--no-progress",
                 *extra])


def test_center_crop_is_adm_style():
    # 64x40 → short side 40 ≥ 2*16: halve to 32x20, resize to 26x16 (bicubic), crop centre.
    arr = np.zeros((40, 64, 3), dtype=np.uint8)
    arr[:, 32:] = 255
    out = center_crop(Image.fromarray(arr), IMAGE_SIZE)
    assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert out[:, 0].max() == 0 and out[:, -1].min() == 255  # the centre column is kept


def test_cache_holds_image_and_flip_skips_broken_and_trains(images, vae_dir, tmp_path, caplog):
    out = tmp_path / "cache"
    caplog.set_level(logging.WARNING, logger="diffmoe")
    assert cache(images, out, vae_dir) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["num_latents"] == len(CLASSES) * PER_CLASS and index["num_skipped"] == 1
    assert index["classes"] == list(CLASSES) and index["scale_factor"] == pytest.approx(0.18215)
    skipped = (out / "skipped.txt").read_text()
    assert "broken.jpg" in skipped and any("could not be decoded" in r.getMessage()
                                           for r in caplog.records)
    # Stored latents are the VAE's posterior means of the crop and of its flip.
    vae = load_vae(vae_dir)
    z = encode_batch(vae, load_image(images / "ant" / "1.png", IMAGE_SIZE)[None], "cpu")
    ds = LatentDataset.open(out)
    assert ds.image_size == IMAGE_SIZE // 2 and ds.channels == 4 and len(ds) == 9
    stored = np.load(out / "shard_00000.npy")
    np.testing.assert_allclose(stored[1], z[0], atol=1e-3)
    pixels = torch.from_numpy(center_crop(Image.open(images / "ant" / "1.png"), IMAGE_SIZE).copy())
    x = pixels.permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        flip = vae.encode(x.flip(-1)).latent_dist.mean
    np.testing.assert_allclose(stored[1, 1], flip[0].numpy(), atol=1e-2)
    # Batches are scaled latents, image or flip at random, with the labels.
    xb, yb = ds.batch(torch.arange(9), torch.Generator().manual_seed(0))
    scaled = torch.from_numpy(np.concatenate([np.load(out / f"shard_0000{i}.npy")
                                              for i in range(3)])).float() * 0.18215
    assert all(torch.allclose(xb[i], scaled[i, 0]) or torch.allclose(xb[i], scaled[i, 1])
               for i in range(9))
    assert yb.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Train two steps on the cache; the sample grid is decoded to RGB by the same VAE.
    run = tmp_path / "run"
    rc = main(["train", "configs/digits_tiny.yaml", f"train.out_dir={run}", "data.name=latents",
               f"data.path={out}", "model.in_channels=4", f"model.input_size={IMAGE_SIZE // 2}",
               "train.batch_size=4", "train.steps=2", "train.ckpt_every=2", "train.sample_every=2",
               "sample.steps=1", "sample.num=3", "sample.batch_size=3"])
    assert rc == 0
    grid = Image.open(run / "samples" / "step_00000002.png")
    assert grid.mode == "RGB" and grid.size[1] >= 2 * IMAGE_SIZE  # decoded, upscaled x2
    assert main(["sample", str(run), "--num", "2", "--steps", "1", "--batch-size", "2",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size[1] >= 2 * IMAGE_SIZE


def test_killed_cache_run_continues_where_it_stopped(images, vae_dir, tmp_path, monkeypatch):
    import diffmoe.data.latents as latents

    out = tmp_path / "cache"
    original, calls = latents.save_shard, []

    def dies_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed while writing shard 1
        return original(*args, **kwargs)

    monkeypatch.setattr(latents, "save_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        latents.cache_latents(images, out, vae_dir, IMAGE_SIZE, shard_size=4, batch_size=3,
                              progress=False)
    assert (out / "shard_00000.json").is_file() and not (out / "shard_00001.json").exists()
    assert not (out / "index.json").exists()
    first = (out / "shard_00000.npy").stat().st_mtime_ns
    saved = []
    monkeypatch.setattr(latents, "save_shard",
                        lambda out, i, z, *rest: saved.append((i, len(z) + len(rest[1])))
                        or original(out, i, z, *rest))
    index = latents.cache_latents(images, out, vae_dir, IMAGE_SIZE, shard_size=4, batch_size=3,
                                  progress=False)
    assert saved == [(1, 4), (2, 2)]  # shards 1 and 2 only (latents + skipped): shard 0 was done
    assert (out / "shard_00000.npy").stat().st_mtime_ns == first
    assert index["num_latents"] == 9
    # Other settings in the same directory are refused.
    assert cache(images, out, vae_dir, "--shard-size", "2") == 2


@pytest.mark.slow
def test_two_ranks_write_the_same_cache_as_one(images, vae_dir, tmp_path):
    import jobs

    assert cache(images, tmp_path / "one", vae_dir) == 0
    proc = jobs.torchrun(
        ["-m", "diffmoe", "cache-latents", str(images), str(tmp_path / "two"), "--vae",
         str(vae_dir), "--image-size", str(IMAGE_SIZE), "--shard-size", "4", "--batch-size", "3",
         "--no-progress"], timeout_s=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("one", "two"))
    assert one["shards"] == two["shards"] and two["num_skipped"] == 1
    for i in range(len(one["shards"])):
        a, b = (np.load(tmp_path / d / f"shard_{i:05d}.npy") for d in ("one", "two"))
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_two_decoding_workers_give_the_same_latents_as_none(images, vae_dir, tmp_path):
    assert cache(images, tmp_path / "w0", vae_dir, "--workers", "0") == 0
    assert cache(images, tmp_path / "w2", vae_dir, "--workers", "2") == 0
    one, two = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("w0", "w2"))
    assert one["shards"] == two["shards"] and two["num_skipped"] == 1
    for shard in one["shards"]:
        for suffix in (".npy", ".labels.npy"):
            a, b = (np.load(tmp_path / d / f"{shard['name']}{suffix}") for d in ("w0", "w2"))
            assert np.array_equal(a, b)  # same order, same batches: bit for bit
    assert (tmp_path / "w0" / "skipped.txt").read_text() == \
        (tmp_path / "w2" / "skipped.txt").read_text()


def test_captioned_folder_caches_latents_for_a_text_model(vae_dir, tmp_path):
    root = tmp_path / "captioned"
    root.mkdir()
    texts = ["a red square", "a blue square", "a red square"]
    for i in range(len(texts)):
        Image.new("RGBA", (20 + i, 18), (200 * (i % 2 == 0), 0, 200, 255)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "cache"
    assert cache(root, out, vae_dir) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["captions"] == ["a blue square", "a red square"] and index["classes"] == []
    assert LatentDataset.open(out).labels.tolist() == [1, 0, 1]
    # A text model trains on the latents; its prompt samples are decoded by the cache's VAE.
    run = tmp_path / "run"
    assert main(["train", "configs/t2i_shapes_tiny.yaml", f"train.out_dir={run}",
                 "data.name=latents", f"data.path={out}", f"data.cache_dir={tmp_path}/text",
                 "model.in_channels=4", f"model.input_size={IMAGE_SIZE // 2}",
                 "model.patch_size=2", "train.batch_size=3", "train.steps=2",
                 "train.ckpt_every=2", "train.sample_every=2", "sample.steps=1", "sample.num=2",
                 "sample.batch_size=2"]) == 0
    assert main(["sample", str(run), "--prompt", "a red square", "--num", "1", "--steps", "1",
                 "--out", str(tmp_path / "s.png")]) == 0
    grid = Image.open(tmp_path / "s.png")
    assert grid.mode == "RGB" and grid.size[1] >= 2 * IMAGE_SIZE  # decoded: pixels, not latents


# -- a latent model that travels: its folder holds what decoding needs -----------------------

def _train_on_cache(images, vae_dir, tmp_path):
    out, run = tmp_path / "cache", tmp_path / "run"
    assert cache(images, out, vae_dir) == 0
    assert main(["train", "configs/digits_tiny.yaml", f"train.out_dir={run}", "data.name=latents",
                 f"data.path={out}", "model.in_channels=4", f"model.input_size={IMAGE_SIZE // 2}",
                 "train.batch_size=4", "train.steps=2", "train.ckpt_every=2",
                 "train.sample_every=2", "sample.steps=1", "sample.num=3",
                 "sample.batch_size=3"]) == 0
    return out, run


def test_a_saved_latent_folder_samples_images_without_its_cache_or_images(
        images, vae_dir, tmp_path, monkeypatch):
    cache_dir, run = _train_on_cache(images, vae_dir, tmp_path)
    folder = load_pretrained(run).save_pretrained(tmp_path / "saved")
    named = load_pretrained(run).save_pretrained(tmp_path / "named", include_vae=False)
    text = (folder / "config.json").read_text()
    data = json.loads(text)["data"]
    assert data["path"] == "" and data["vae"] == "" and str(cache_dir) not in text
    assert data["scale_factor"] == pytest.approx(0.18215) and data["shift_factor"] == 0
    assert data["downsampling"] == 2  # the tiny VAE's two levels
    assert json.loads((folder / "vae" / "config.json").read_text())["_class_name"] == \
        "AutoencoderKL"
    assert "latent space" in (folder / "README.md").read_text()
    assert not (named / "vae").exists()
    assert json.loads((named / "config.json").read_text())["data"]["vae"] == \
        str(vae_dir.resolve())
    # Another machine: no cache, no images, no run; the folder read from elsewhere.
    for gone in (cache_dir, images, run):
        shutil.rmtree(gone)
    moved = tmp_path / "elsewhere" / "model"
    shutil.move(str(folder), moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    pipe = DiffMoEPipeline.from_pretrained("model", device="cpu")
    pil = pipe(class_labels=[0, 2], num_inference_steps=1, generator=3).images
    assert [(im.mode, im.size) for im in pil] == [("RGB", (IMAGE_SIZE, IMAGE_SIZE))] * 2
    pt = pipe(class_labels=[0, 2], num_inference_steps=1, generator=3, output_type="pt").images
    assert pt.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and 0 <= pt.min() and pt.max() <= 1
    arr = pipe(class_labels=[0, 2], num_inference_steps=1, generator=3, output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    latents = pipe(class_labels=[0, 2], num_inference_steps=1, generator=3,
                   output_type="latent").images
    assert latents.shape == (2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    # The images are those latents, unscaled by the recorded factor and decoded by vae/.
    vae = load_vae(moved / "vae")
    with torch.no_grad():
        decoded = vae.decode(latents / 0.18215).sample.clamp(-1, 1).add(1).div(2)
    torch.testing.assert_close(pt, decoded, rtol=0, atol=1e-5)
    # The command samples the folder too, decoded.
    assert main(["sample", "model", "--num", "2", "--steps", "1", "--batch-size", "2",
                 "--out", "grid.png"]) == 0
    grid = Image.open("grid.png")
    assert grid.mode == "RGB" and grid.size[1] >= 2 * IMAGE_SIZE  # decoded, upscaled x2
    # A folder that names its VAE only: that VAE, or another one passed, decodes.
    named_pipe = DiffMoEPipeline.from_pretrained(named, device="cpu")
    assert named_pipe(class_labels=[1], num_inference_steps=1).images[0].mode == "RGB"
    other = DiffMoEPipeline.from_pretrained(named, device="cpu", vae=load_vae(vae_dir))
    assert other(class_labels=[1], num_inference_steps=1, output_type="pt").images.shape[1] == 3


def _latent_pretrained(tmp_path, **data) -> Pretrained:
    """An untrained latent model whose config records its latent space and names no cache."""
    cfg = load_config(ROOT / "configs" / "digits_tiny.yaml", [
        "data.name=latents", "model.in_channels=4", f"model.input_size={IMAGE_SIZE // 2}",
        "data.scale_factor=0.18215", "data.downsampling=2",
        *(f"data.{k}={v}" for k, v in data.items())])
    return Pretrained(build_model(cfg.model).eval(), cfg, 0, "ema", tmp_path)


def test_a_latent_model_without_a_vae_says_what_to_pass_and_still_gives_latents(
        tmp_path, vae_dir):
    pipe = DiffMoEPipeline(_latent_pretrained(tmp_path))
    with pytest.raises(DataError, match="names no VAE.*--vae DIR.*output_type='latent'"):
        pipe(class_labels=[0], num_inference_steps=1)
    assert pipe.last is None  # refused before sampling
    assert pipe(class_labels=[0], num_inference_steps=1, output_type="latent").images.shape == (
        1, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    with pytest.raises(ConfigError, match="VAE is not known.*vae=DIR"):
        pipe.save_pretrained(tmp_path / "folder")
    assert not (tmp_path / "folder").exists()
    # A VAE of other latents is refused before sampling, one line.
    other = save_tiny_vae(tmp_path / "vae8", latent_channels=8)
    with pytest.raises(DataError, match="8 latent channels but the model 4"):
        DiffMoEPipeline(_latent_pretrained(tmp_path, vae=other))(class_labels=[0])
    deeper = save_tiny_vae(tmp_path / "vae3", levels=3)
    with pytest.raises(DataError, match="downsamples by 4 but the model's latents .* by 2"):
        DiffMoEPipeline(_latent_pretrained(tmp_path, vae=deeper))(class_labels=[0])
    # Saving with a VAE passed writes it as vae/; with include_vae=False over that vae/ is
    # refused, since loading would still use it.
    folder = pipe.save_pretrained(tmp_path / "folder", vae=vae_dir)
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(ConfigError, match="holds the VAE of an earlier save"):
        pipe.save_pretrained(folder, include_vae=False, vae=vae_dir)


def test_a_pixel_model_refuses_latent_output_and_gives_np(tmp_path):
    cfg = load_config(ROOT / "configs" / "digits_tiny.yaml")
    pipe = DiffMoEPipeline(Pretrained(build_model(cfg.model).eval(), cfg, 0, "ema", tmp_path))
    with pytest.raises(ConfigError, match="output_type='latent' is for latent models"):
        pipe(class_labels=[0], num_inference_steps=1, output_type="latent")
    arr = pipe(class_labels=[0, 1], num_inference_steps=1, output_type="np").images
    size = cfg.model.input_size
    assert arr.shape == (2, size, size, cfg.model.in_channels) and arr.dtype == np.float32
    with pytest.raises(ConfigError, match="vae= decodes a latent model"):
        pipe.save_pretrained(tmp_path / "folder", vae=tmp_path)
    assert not (tmp_path / "folder").exists()
