"""``diffmoe cache-latents`` with decoding workers against none: images/s and identical latents.

Generates a folder of JPEGs at ImageNet-like sizes (smooth colour gradients with noise, 4 classes)
and a tiny randomly initialised ``AutoencoderKL`` (the one tests/test_latents.py builds), then
writes the same cache once per ``--workers`` value, interleaved over ``--repeats`` rounds (after
one untimed round), each into a new directory; reports the median images/s of each and checks
that every cache holds the same latents, bit for bit, as the first.

    python benchmarks/cache_latents_workers.py [--images 512] [--workers 0 2] [--repeats 3]
        [--image-size 16] [--batch-size 32] [--json]

With the tiny VAE the encoder costs little, so the figures measure decoding and cropping: what
the workers take off the main process. A real VAE on a GPU leaves decoding as the bottleneck too;
on a CPU the VAE itself dominates.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import emit, machine, table
from PIL import Image

from diffmoe.data.latents import cache_latents

CLASSES = 4
SIZES = ((500, 375), (375, 500), (500, 333), (640, 480))  # typical ImageNet JPEGs


def make_folder(root: Path, num: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(num):
        w, h = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 255, 3)
        arr = (base + 0.2 * x[..., None] + 0.1 * y[..., None]
               + rng.normal(0, 12, (h, w, 3))) % 256
        folder = root / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def tiny_vae(path: Path, image_size: int) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                  layers_per_block=1, norm_num_groups=4, sample_size=image_size
                  ).save_pretrained(path)


def shards(out: Path) -> list[np.ndarray]:
    return [np.load(p) for p in sorted(out.glob("shard_*.npy"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-size", dest="image_size", type=int, default=16)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "images", args.images)
        tiny_vae(tmp / "vae", args.image_size)
        seconds: dict[int, list[float]] = {w: [] for w in args.workers}
        reference, identical = None, True
        for r in range(-1, args.repeats):  # round -1 warms up (imports, the VAE), untimed
            for w in args.workers:
                out = tmp / f"cache-{r}-{w}"
                start = time.perf_counter()
                cache_latents(tmp / "images", out, tmp / "vae", args.image_size,
                              shard_size=256, batch_size=args.batch_size, device="cpu",
                              progress=False, workers=w)
                if r >= 0:
                    seconds[w].append(time.perf_counter() - start)
                latents = shards(out)
                reference = reference if reference is not None else latents
                identical &= all(np.array_equal(a, b) for a, b in zip(reference, latents))
    rows = [{"workers": w, "median_s": statistics.median(seconds[w]),
             "images_per_s": args.images / statistics.median(seconds[w])}
            for w in args.workers]
    result = {"images": args.images, "image_size": args.image_size,
              "batch_size": args.batch_size, "repeats": args.repeats, "rows": rows,
              "identical_latents": identical, "machine": machine()}
    text = (table(rows, ["workers", "median_s", "images_per_s"])
            + f"\nidentical latents across worker counts: {identical}")
    emit(result, text, args.json)


if __name__ == "__main__":
    main()
