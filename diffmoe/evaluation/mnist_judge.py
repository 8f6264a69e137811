"""An MNIST classifier that judges class-conditional samples: does a sample of class c read as c?

A small CNN (three 3×3 convolutions with max-pooling, then two linear layers, 47.5K parameters)
on MNIST padded to 32×32, the resolution the project's MNIST models generate. Its weights,
``mnist_judge.safetensors`` beside this file, are committed rather than trained on first use, so
that every machine judges with the same network (a class-consistency figure then means the same
thing everywhere) and nothing slow runs the first time a result is wanted. They were made by
``python benchmarks/mnist_judge.py --out diffmoe/evaluation/mnist_judge.safetensors``, which calls
:func:`train_judge`: deterministic on the CPU (fixed seed, fixed data order and shifts, torch's
deterministic algorithms, one intra-op thread), about a minute on 2 cores, from the packaged
MNIST train split only (50,000 images); its accuracy on the 10,000 held-out test images is
recorded in the file's metadata and in docs/replication.md.

:func:`class_consistency` is the share of generated samples the judge reads as the label they
were generated for.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from tqdm import tqdm

from ..config import Config
from ..data import build_dataset, to_model_range
from ..errors import ConfigError, DataError
from ..fileio import save_safetensors

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).with_name("mnist_judge.safetensors")
NUM_CLASSES = 10
IMAGE_SIZE = 32  # MNIST padded from 28 (data/datasets.py)
CHANNELS = (16, 32, 32)  # the three convolutions' widths; each halves the side (32 → 4)
HIDDEN = 64
EVAL_BATCH = 500


@dataclass(frozen=True)
class JudgeRecipe:
    """How the committed judge was trained (:func:`train_judge`)."""

    seed: int = 0
    epochs: int = 3
    batch_size: int = 128
    lr: float = 8e-3
    weight_decay: float = 1e-4
    # Random translation by up to this many pixels each way (the padding leaves room), so that a
    # generated digit a little off centre is still read.
    max_shift: int = 2
    # Train on the first N images of the split only (0 = all 50,000); for quick checks.
    limit: int = 0


class MnistJudge(nn.Module):
    """uint8 or [-1, 1] images (N, 1, 32, 32) → class logits (N, 10)."""

    def __init__(self):
        super().__init__()
        widths = (1,) + CHANNELS
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1)
                                   for a, b in zip(widths[:-1], widths[1:]))
        side = IMAGE_SIZE // 2 ** len(CHANNELS)
        self.fc1 = nn.Linear(CHANNELS[-1] * side * side, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, NUM_CLASSES)

    def forward(self, images: Tensor) -> Tensor:
        x = to_model_range(images) if images.dtype == torch.uint8 else images.float()
        if x.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"the MNIST judge reads (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) images; "
                            f"got {tuple(images.shape)}")
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    @torch.no_grad()
    def classify(self, images: Tensor) -> Tensor:
        """The class the judge reads in each image, (N,)."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self(chunk).argmax(1) for chunk in images.split(EVAL_BATCH)])
        finally:
            self.train(was_training)


def class_consistency(judge: MnistJudge, images: Tensor, labels: Tensor) -> dict:
    """The share of ``images`` (uint8, or [-1, 1] floats, (N, 1, 32, 32)) the judge reads as their
    ``labels``, overall and per class (classes without images left out)."""
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise DataError(f"class consistency needs one label per image and at least one image; "
                        f"got {images.shape[0]} images and {labels.shape[0]} labels")
    hit = judge.classify(images).cpu() == labels.cpu()
    per_class = {str(c): float(hit[labels == c].float().mean())
                 for c in range(NUM_CLASSES) if bool((labels == c).any())}
    return {"class_consistency": float(hit.float().mean()), "per_class": per_class,
            "num": int(hit.numel())}


def check_judgeable(cfg: Config) -> None:
    """Refuse, in one line, a model whose samples the judge cannot read: it reads
    class-conditional pixel images of 1 × 32 × 32 in 10 classes (MNIST padded to 32)."""
    m = cfg.model
    makes = (m.condition == "class" and cfg.data.name != "latents" and m.in_channels == 1
             and m.input_size == IMAGE_SIZE and m.num_classes == NUM_CLASSES)
    if not makes:
        what = ("text-conditioned images" if m.condition == "text" else
                f"{m.num_classes}-class {m.in_channels}x{m.input_size}x{m.input_size} "
                f"{'latents' if cfg.data.name == 'latents' else 'images'}")
        raise ConfigError(f"--judge reads samples with the MNIST judge, which reads 10-class "
                          f"1x{IMAGE_SIZE}x{IMAGE_SIZE} pixel images; this checkpoint's model "
                          f"makes {what}; drop --judge")


def judge_samples(images: Tensor, labels: Tensor) -> dict:
    """The committed judge's class consistency of ``images`` drawn for ``labels`` (as
    :func:`class_consistency`), with the judge's own accuracy on the MNIST test split beside it,
    so a reader knows how far to trust the figure."""
    result = class_consistency(load_judge(), images, labels)
    return {"judge": {**result, "judge_test_accuracy": judge_metadata().get("test_accuracy")}}


def shifted(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Each image rolled by its own random (dy, dx) in [-max_shift, max_shift] (the padding rolls
    round, so nothing of the digit is lost)."""
    shifts = torch.randint(-max_shift, max_shift + 1, (images.shape[0], 2), generator=generator)
    return torch.stack([img.roll(tuple(s.tolist()), dims=(1, 2))
                        for img, s in zip(images, shifts)])


def train_judge(recipe: Optional[JudgeRecipe] = None, progress: bool = True) -> MnistJudge:
    """Train the judge on the MNIST train split with ``recipe`` (default: the committed judge's),
    deterministically on the CPU. Sets torch's intra-op threads to 1 and its
    deterministic-algorithms flag while it runs."""
    recipe = recipe or JudgeRecipe()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(recipe.seed)
        data = build_dataset("mnist", "train", limit=recipe.limit)
        judge = MnistJudge()
        opt = torch.optim.AdamW(judge.parameters(), lr=recipe.lr,
                                weight_decay=recipe.weight_decay)
        gen = torch.Generator().manual_seed(recipe.seed)
        steps = recipe.epochs * (len(data) // recipe.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=steps)
        judge.train()
        with tqdm(total=steps, desc="judge", disable=not progress, dynamic_ncols=True) as bar:
            for _ in range(recipe.epochs):
                order = torch.randperm(len(data), generator=gen)
                for i in range(len(data) // recipe.batch_size):
                    idx = order[i * recipe.batch_size:(i + 1) * recipe.batch_size]
                    x = shifted(data.images[idx], recipe.max_shift, gen)
                    loss = F.cross_entropy(judge(x), data.labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    schedule.step()
                    bar.update(1)
        return judge.eval()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def held_out_accuracy(judge: MnistJudge) -> float:
    """Accuracy on the 10,000 images of the MNIST test split (never seen in training)."""
    test = build_dataset("mnist", "test")
    return float((judge.classify(test.images) == test.labels).float().mean())


def save_judge(judge: MnistJudge, path: str | Path, meta: dict) -> Path:
    """The weights as safetensors, ``meta`` (the recipe, the test accuracy) as JSON metadata."""
    save_safetensors({k: v.contiguous() for k, v in judge.state_dict().items()}, path,
                     metadata={"judge": json.dumps(meta)})
    return Path(path)


@functools.lru_cache(maxsize=1)
def load_judge(path: Optional[str] = None) -> MnistJudge:
    """The committed judge (or the one at ``path``), ready to classify."""
    path = Path(path) if path else WEIGHTS
    if not path.is_file():
        raise DataError(f"the MNIST judge's weights {path} are missing; remake them with "
                        f"python benchmarks/mnist_judge.py --out {path}")
    judge = MnistJudge()
    try:
        judge.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError) as exc:
        raise DataError(f"the MNIST judge's weights {path} do not load ({exc}); remake them with "
                        f"python benchmarks/mnist_judge.py --out {path}") from None
    for p in judge.parameters():
        p.requires_grad_(False)
    return judge.eval()


def judge_metadata(path: Optional[str] = None) -> dict:
    """What the weights file says about itself: the recipe and the test accuracy."""
    from safetensors import safe_open

    with safe_open(str(path or WEIGHTS), "pt") as fh:
        return json.loads((fh.metadata() or {}).get("judge", "{}"))
