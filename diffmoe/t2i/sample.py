"""Sampling from a text-to-image checkpoint, and judging it (``diffmoe sample --prompt``,
``diffmoe eval`` on a text-to-image run).

The evaluation generates ``samples_per_prompt`` images for each of ``per_category`` prompts of
each GenEval category (shapes.eval_prompts), judges them from their pixels (judge.py), and
compares them with the shapes test split by FID with the project's Inception. Beside the scores
it reports the judge's *chance level*: the same judge on ground-truth renders of other prompts of
the same category, i.e. what an image that ignores the prompt's details scores.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..data import to_model_range, to_uint8
from ..data.shapes import CATEGORY_NAMES, SHAPES, eval_prompts, parse_caption, render
from ..data.text_encoder import check_prompts, encode_prompts
from ..device import resolve_device
from ..errors import ConfigError
from ..evaluation.metrics import min_set_size
from ..fileio import write_json
from ..hub import read_config
from ..images import save_grid
from ..pipeline import DiffMoEPipeline, warnings_logged
from ..sample import option_name, recorded_settings, summary_path
from .judge import NO_OBJECT, judge

log = logging.getLogger(__name__)

CHANCE_SEED = 12345  # the shuffle of prompts for the chance level
CHANCE_ROW = "chance (renders of other prompts)"  # its row in the tables


def checkpoint_condition(path: str | Path) -> str:
    """``class`` or ``text``: what the model of a checkpoint, run or folder is conditioned on."""
    return read_config(path).model.condition


def check_condition_args(condition: str, prompts: Optional[list[str]], labels: Optional[str],
                         command: str) -> None:
    """Class labels for a text model, or prompts for a class model: one-line errors."""
    if condition == "text" and labels is not None:
        raise ConfigError("this checkpoint is text-to-image and has no class labels; drop "
                          "--labels and describe the images with --prompt 'a red circle'"
                          if command == "sample" else
                          "this checkpoint is text-to-image and has no class labels; drop "
                          "--labels (the evaluation uses the shapes prompts)")
    if condition == "text" and command == "sample" and not prompts:
        raise ConfigError("this checkpoint is text-to-image; say what to draw with --prompt, "
                          "e.g. --prompt 'a red circle' --prompt 'two blue squares'")
    if condition == "class" and prompts:
        raise ConfigError("this checkpoint is class-conditional and takes no --prompt; choose "
                          "classes with --labels, or sample a text-to-image run")


def sample_prompts(path: str | Path, overrides: dict, out: str | Path, prompts: list[str],
                   device: str | torch.device = "auto", vae: Any = None) -> dict:
    """``diffmoe sample RUN --prompt P ...`` through the pipeline: one grid row per prompt,
    ``sample.num`` images split evenly over the prompts (at least one each), and a JSON summary
    beside the PNG (``sample.summary_path``; the caller has checked both may be written)."""
    out = Path(out)
    check_prompts(prompts)
    pipe, s = DiffMoEPipeline.for_settings(path, overrides, device, vae, option_name)
    per_prompt = max(1, s.num // len(prompts))
    cond = encode_prompts(pipe.config.model, prompts, pipe.device)
    index = torch.arange(len(prompts)).repeat_interleave(per_prompt)
    pipe.decoder()  # a latent model's VAE is found (or its absence reported) before sampling
    with warnings_logged():
        images, report = pipe.draw(cond[index], s, name=option_name)
    save_grid(images, out, nrow=per_prompt, upscale=2)
    summary = {
        "checkpoint": str(pipe.pretrained.source), "step": pipe.pretrained.step,
        "image": str(out), "settings": dict(recorded_settings(s, report.mode), num=len(index)),
        "prompts": prompts, "rows": "one row per prompt, in order",
        "c_avg_infer": report.c_avg_infer, "capacity_per_layer": report.per_layer,
        "activated_params": report.activated_params, "total_params": report.total_params,
    }
    write_json(summary_path(out), summary)
    return summary


@dataclass
class JudgeOptions:
    per_category: int = 8  # prompts per GenEval category
    samples_per_prompt: int = 4
    categories: tuple[str, ...] = CATEGORY_NAMES  # the GenEval categories to judge
    prompt_seed: int = 0
    fid: bool = True
    feature_batch: int = 50
    cache_dir: Optional[str] = None
    device: str = "auto"
    progress: bool = True


def chance_level(prompts: list[str], categories: list[str], seed: int = CHANCE_SEED) -> dict:
    """The judge's scores for ground-truth renders of *other* prompts of the same category."""
    rng = random.Random(seed)
    shuffled = list(prompts)
    for name in CATEGORY_NAMES:
        idx = [i for i, c in enumerate(categories) if c == name]
        other = [prompts[i] for i in idx]
        rng.shuffle(other)
        for i, p in zip(idx, other):
            shuffled[i] = p
    images = np.stack([render(parse_caption(p), seed + i) for i, p in enumerate(shuffled)])
    return judge(prompts, images)


def evaluate_text_checkpoint(path: str | Path, overrides: dict, options: JudgeOptions) -> dict:
    """The judge's six GenEval-style scores and overall, the chance level, FID against the
    shapes test split, and the capacity DiffMoE spent."""
    resolve_device(options.device, "--device")  # a bad --device is refused before any work
    pairs = eval_prompts(options.per_category, options.prompt_seed, tuple(options.categories))
    categories = [c for c, _ in pairs for _ in range(options.samples_per_prompt)]
    prompts = [p for _, p in pairs for _ in range(options.samples_per_prompt)]
    if options.fid and len(prompts) < min_set_size(with_features=True):
        raise ConfigError(f"{len(prompts)} images are too few for FID against the shapes test "
                          f"split (at least {min_set_size(with_features=True)}); raise "
                          f"--per-category or --samples-per-prompt, or pass --no-fid")
    pipe, s = DiffMoEPipeline.for_settings(path, dict(overrides, num=len(prompts)),
                                           options.device, name=option_name)
    data = pipe.config.data.name
    if data != "shapes":
        raise ConfigError(f"the judge knows the shapes domain only, but this checkpoint was "
                          f"trained on data.name={data}; evaluate a shapes run")
    cond = encode_prompts(pipe.config.model, prompts, pipe.device)
    with warnings_logged():
        images, report = pipe.draw(cond, s, progress=options.progress, name=option_name)
    pixels = to_uint8(images)
    result = judge(prompts, pixels.permute(0, 2, 3, 1).numpy())
    chance = chance_level(prompts, categories)
    fid = _fid(pixels, options) if options.fid else None
    return {
        "checkpoint": str(pipe.pretrained.source), "step": pipe.pretrained.step,
        "rule": "geneval",
        "scores": result["scores"], "overall": result["overall"], "counts": result["counts"],
        "strict_scores": result["strict_scores"], "strict_overall": result["strict_overall"],
        "colour_match": result["colour_match"], "shape_confusion": result["shape_confusion"],
        "chance": {k: chance[k] for k in ("scores", "overall", "strict_scores",
                                          "strict_overall", "colour_match",
                                          "shape_confusion")},
        "fid": fid,
        "c_avg_infer": report.c_avg_infer,
        "activated_params": report.activated_params,
        "total_params": report.total_params,
        "settings": dict(recorded_settings(s, report.mode),
                         **{f"judge_{k}": v for k, v in asdict(options).items()}),
        "samples": [{"prompt": p, "category": c, "correct": v, "correct_strict": w}
                    for p, c, v, w in zip(prompts, categories, result["verdicts"],
                                          result["strict_verdicts"])],
        "_images": pixels,
    }


def _fid(pixels: torch.Tensor, options: JudgeOptions) -> dict:
    from ..data.captioned import load_shapes
    from ..evaluation.inception import inception_id
    from ..evaluation.metrics import compare
    from ..evaluation.reference import _cached_or_computed, cache_dir, features_of_images

    num = pixels.shape[0]
    # The renders are cheap; naming the cache by their content keeps it from outliving a change
    # to the renderer (object sizes, colours), which the split's name alone would not show.
    images = load_shapes("test", num).images
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]
    path = (cache_dir(options.cache_dir) / "fid"
            / f"shapes-test-n{num}-{digest}-{inception_id()}.npz")
    reference = _cached_or_computed(path, f"shapes:test:{num}", lambda: images,
                                    options.feature_batch, options.progress)
    generated = features_of_images(pixels, options.feature_batch, options.progress,
                                   "generated")
    metrics = compare(reference.stats, generated)
    for warning in metrics["warnings"]:
        log.warning("%s", warning)
    return {"fid": metrics["fid"], "kid": metrics["kid"], "reference": reference.source,
            "num": num}


def judge_outputs(out: str | Path) -> list[Path]:
    """The files ``diffmoe eval`` writes for a text-to-image checkpoint: the results JSON
    ``out`` and the judged grid beside it."""
    return [Path(out), Path(out).with_suffix(".png")]


def save_judged_grid(result: dict, path: str | Path) -> Path:
    """The evaluation's images, two prompts per row, in the order of ``result['samples']``."""
    per_prompt = result["settings"]["judge_samples_per_prompt"]
    return save_grid(to_model_range(result["_images"]), path, nrow=per_prompt * 2, upscale=2)


def public(result: dict) -> dict:
    """The result without its in-memory images (for JSON)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def judge_table(results: dict[str, dict], strict: bool = False) -> str:
    """A Markdown table of judged results by name, with the chance level as the last row:
    GenEval's rules, or the strict rule with ``strict``."""
    key = "strict_" if strict else ""
    judged = [c for c in CATEGORY_NAMES if c in next(iter(results.values()))["scores"]]
    # GenEval's overall is the mean of all six; of fewer it is only their mean.
    overall = "overall" if len(judged) == len(CATEGORY_NAMES) else "mean of these"
    head = ("| model | " + " | ".join(judged)
            + f" | {overall} | colour match (colors, color_attr) | FID |")
    rows = [head, "|" + "---|" * (len(judged) + 4)]

    def match(r: dict) -> str:
        m = r.get("colour_match") or {}
        return ", ".join(f"{m[c]:.2f}" if c in m else "-" for c in ("colors", "color_attr"))

    def cells(r: dict) -> str:
        return " | ".join(f"{r[key + 'scores'].get(c, float('nan')):.2f}"
                          for c in judged) + f" | {r[key + 'overall']:.2f}"

    for name, r in results.items():
        fid = f"{r['fid']['fid']:.1f}" if r.get("fid") else "-"
        rows.append(f"| {name} | {cells(r)} | {match(r)} | {fid} |")
    chance = next(iter(results.values()))["chance"]
    rows.append(f"| {CHANCE_ROW} | {cells(chance)} | {match(chance)} | - |")
    return "\n".join(rows)


def shape_confusion_table(results: dict[str, dict]) -> str:
    """A Markdown table of what each result drew for one-object prompts: per asked shape, the
    fraction of images whose largest object has each shape (or none), chance level last."""
    drawn = list(SHAPES) + [NO_OBJECT]
    rows = ["| model | asked | " + " | ".join(drawn) + " | images |",
            "|" + "---|" * (len(drawn) + 3)]
    named = dict(results)
    named[CHANCE_ROW] = next(iter(results.values()))["chance"]
    for name, r in named.items():
        for asked, counts in r.get("shape_confusion", {}).items():
            total = sum(counts.values())
            cells = " | ".join(f"{counts.get(d, 0) / total:.2f}" for d in drawn)
            rows.append(f"| {name} | {asked} | {cells} | {total} |")
    return "\n".join(rows)
