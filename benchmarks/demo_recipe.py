"""The demo's recipe study: which training recipe of `make demo` (configs/mnist_diffmoe.yaml)
gives the best held-out loss, FID and class consistency in its 15 minutes on 2 CPU cores.
docs/demo.md shows and discusses the results.

    python benchmarks/demo_recipe.py [--out runs/demo-recipe] [--rows PATTERN ...] [--threads 1]
                                     [--list] [--report]
    python benchmarks/demo_recipe.py --speed NAME|config [--speed ...] [--threads 2] [--steps 60]

Each candidate is a set of overrides of the demo config. Its ``train-<name>`` row trains it with
the library's Trainer at ``--threads`` intra-op threads (default 1, so that two candidates run
side by side on 2 cores) and records the CPU time per step (``time.process_time``, which other
work on a shared machine barely changes, unlike the wall clock) and the held-out flow-matching
loss of its EMA weights (``diffmoe/evaluation/heldout.py``: 512 MNIST test images, 8 times, fixed
noise). Its ``eval-<name>-<setting>`` rows sample from the final checkpoint exactly as
``diffmoe sample`` does (balanced labels 0-9, the demo's sampling batch of 100, dynamic routing,
batch seeds from ``sample.seed`` 0, so the first 100 images are the demo's grid) and measure FID
against the 10,000 MNIST test images (FID Inception under bfloat16 autocast, as the replication
study, benchmarks/replicate.py) and the MNIST judge's class consistency
(``diffmoe/evaluation/mnist_judge.py``). Every row writes ``OUT/rows/<row>.json`` when done; a
rerun skips finished rows. ``--report`` prints the table of docs/demo.md from the finished rows.

``--speed`` times candidates' training steps (wall and CPU seconds per step, after a warm-up) and
one training sample grid at ``--threads`` threads, and says how many minutes the whole run would
take at that speed: run on a quiet machine, it checks that the demo fits its 15 minutes
(``--speed config`` times configs/mnist_diffmoe.yaml as ``make demo`` trains it).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from common import machine

from diffmoe.config import Config, load_config
from diffmoe.data import build_dataset, to_uint8
from diffmoe.diffusion import build_objective
from diffmoe.evaluation.heldout import HeldOutSet, heldout_loss
from diffmoe.evaluation.inception import default_extractor
from diffmoe.evaluation.metrics import FeatureStats, compare
from diffmoe.evaluation.mnist_judge import class_consistency, judge_metadata, load_judge
from diffmoe.evaluation.reference import dataset_reference
from diffmoe.fileio import write_json
from diffmoe.hub import load_pretrained
from diffmoe.images import save_grid
from diffmoe.models.moe import Routing
from diffmoe.sample import generate, sampling_settings
from diffmoe.train import Trainer

log = logging.getLogger("demo_recipe")
ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "mnist_diffmoe.yaml"
FEATURE_PRECISION = "bf16"
REF_NUM = 10000  # MNIST test images in the FID reference
HELDOUT_IMAGES, HELDOUT_TIMES, HELDOUT_SEED, HELDOUT_BATCH = 512, 8, 4321, 64
CURVE_POINTS = 4  # held-out loss measurements along training (the last at the end)

# The demo's recipe before this study (configs/mnist_diffmoe.yaml at 22e6299).
OLD = ("model.patch_size=4", "model.depth=6", "model.hidden_size=128", "model.num_heads=4",
       "model.final_conv=false", "model.class_dropout=0.1", "model.moe.num_experts=4",
       "train.steps=3000", "train.batch_size=32", "train.lr=1.5e-3", "train.warmup_steps=200",
       "train.lr_schedule=cosine", "train.ema_decay=0.999", "train.ema_warmup=true")

# name -> overrides on top of OLD (later overrides win).
CANDIDATES: dict[str, tuple[str, ...]] = {
    "old": (),
    # Shallower or narrower: cheaper steps, so more of them in the same time.
    "d128x4": ("model.depth=4", "train.steps=4900"),
    "d96x6": ("model.hidden_size=96", "train.steps=4700"),
    # Variants of d128x4 at its steps.
    "d128x4-lr3e-3": ("model.depth=4", "train.steps=4900", "train.lr=3e-3"),
    "d128x4-b16": ("model.depth=4", "train.steps=9800", "train.batch_size=16", "train.lr=1e-3",
                   "train.warmup_steps=400"),
    "d128x4-fconv": ("model.depth=4", "train.steps=4900", "model.final_conv=true"),
    "d128x4-ln": ("model.depth=4", "train.steps=4900", "objective.time_sampling=logit_normal"),
    "d128x4-ln-lr3e-3": ("model.depth=4", "train.steps=4900",
                         "objective.time_sampling=logit_normal", "train.lr=3e-3"),
    "d96x4-ln-lr3e-3": ("model.depth=4", "model.hidden_size=96", "train.steps=6900",
                        "objective.time_sampling=logit_normal", "train.lr=3e-3"),
    "d128x4-ln-lr3e-3-fconv": ("model.depth=4", "train.steps=4900", "model.final_conv=true",
                               "objective.time_sampling=logit_normal", "train.lr=3e-3"),
    # On the Intel machine two threads ran a step 1.8x faster than one (the AMD machine of the
    # earlier candidates: barely faster), so the 15 minutes hold more steps.
    "d96x4-ln-lr3e-3-11k": ("model.depth=4", "model.hidden_size=96", "train.steps=11000",
                            "train.warmup_steps=300", "objective.time_sampling=logit_normal",
                            "train.lr=3e-3"),
    "d128x4-ln-lr3e-3-8k": ("model.depth=4", "train.steps=8000", "train.warmup_steps=300",
                            "objective.time_sampling=logit_normal", "train.lr=3e-3"),
    # Toward the noisy end (t = 0 is noise): the times where a sample's class is decided.
    "d96x4-lnm05-lr3e-3-11k": ("model.depth=4", "model.hidden_size=96", "train.steps=11000",
                               "train.warmup_steps=300", "objective.time_sampling=logit_normal",
                               "objective.logit_mean=-0.5", "train.lr=3e-3"),
    "d96x4-ln-lr3e-3-b64-6k": ("model.depth=4", "model.hidden_size=96", "train.steps=6000",
                               "train.batch_size=64", "train.warmup_steps=200",
                               "objective.time_sampling=logit_normal", "train.lr=3e-3"),
    "d128x4-ln-lr3e-3-9k": ("model.depth=4", "train.steps=9000", "train.warmup_steps=300",
                            "objective.time_sampling=logit_normal", "train.lr=3e-3"),
    "d128x4-ln-lr3e-3-9k-cd05": ("model.depth=4", "train.steps=9000", "train.warmup_steps=300",
                                 "objective.time_sampling=logit_normal", "train.lr=3e-3",
                                 "model.class_dropout=0.05"),
}


@dataclass(frozen=True)
class Setting:
    """How an eval row samples: sampler, steps, guidance, which weights, how many images."""

    sampler: str = "euler"
    steps: int = 50
    cfg_scale: float = 1.0
    weights: str = "ema"
    num: int = 1000

    @property
    def name(self) -> str:
        w = "" if self.weights == "ema" else f"-{self.weights}"
        return f"{self.sampler}{self.steps}-cfg{self.cfg_scale:g}{w}-n{self.num}"


UNGUIDED, GUIDED = Setting(), Setting(cfg_scale=4.0, num=200)
SETTINGS = {"unguided": UNGUIDED, "guided": GUIDED}
# The further settings an eval row may name: eval-<candidate>-<setting>.
EXTRA_SETTINGS = {
    "raw": Setting(weights="raw"),
    "heun25": Setting(sampler="heun", steps=25),
    "heun50": Setting(sampler="heun", steps=50),
    "euler25": Setting(steps=25),
    "guided1000": Setting(cfg_scale=4.0),
    "cfg2": Setting(cfg_scale=2.0, num=200),
}


def rows() -> list[str]:
    out = []
    for name in CANDIDATES:
        out += [f"train-{name}"] + [f"eval-{name}-{s}" for s in SETTINGS]
    return out


class Study:
    def __init__(self, out: Path):
        self.out = out
        self._reference: Optional[FeatureStats] = None
        self._heldout: Optional[HeldOutSet] = None

    def row_path(self, row: str) -> Path:
        return self.out / "rows" / f"{row}.json"

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def config(self, name: str) -> Config:
        steps = int(next((o.split("=")[1] for o in reversed(OLD + CANDIDATES[name])
                          if o.startswith("train.steps=")), 0))
        return load_config(BASE_CONFIG, [
            *OLD, *CANDIDATES[name], f"train.out_dir={self.run_dir(name)}",
            f"train.num_threads={torch.get_num_threads()}", "train.max_minutes=0",
            f"train.sample_every={steps}", f"train.ckpt_every={steps}", "train.log_every=100",
            "train.keep_checkpoints=1"])

    def heldout(self) -> HeldOutSet:
        if self._heldout is None:
            self._heldout = HeldOutSet.build(build_dataset("mnist", "test"), HELDOUT_IMAGES,
                                             HELDOUT_TIMES, HELDOUT_SEED)
        return self._heldout

    def reference(self) -> FeatureStats:
        if self._reference is None:
            self._reference = dataset_reference("mnist:test", REF_NUM, self.out / "cache",
                                                progress=True, precision=FEATURE_PRECISION).stats
        return self._reference


def run_train(study: Study, name: str) -> dict:
    """Train one candidate; its held-out loss (EMA weights, dynamic routing) along the way."""
    cfg = study.config(name)
    run_dir = study.run_dir(name)
    if run_dir.exists():  # an interrupted attempt: start again
        shutil.rmtree(run_dir)
    steps = cfg.train.steps
    points = {round(steps * (i + 1) / CURVE_POINTS) for i in range(CURVE_POINTS)}
    curve, train_cpu, train_wall = [], 0.0, 0.0
    trainer = Trainer(cfg)
    try:
        while trainer.step < steps:
            cpu, wall = time.process_time(), time.perf_counter()
            trainer.train_step()
            if trainer.step % cfg.train.log_every == 0 or trainer.step == steps:
                trainer.settle()
            train_cpu += time.process_time() - cpu
            train_wall += time.perf_counter() - wall
            if trainer.step in points:
                loss = heldout_loss(trainer.ema, trainer.objective, study.heldout(),
                                    Routing("dynamic"), HELDOUT_BATCH)["loss"]
                curve.append({"step": trainer.step, "loss": loss})
                log.info("%s step %d: held-out loss %.5f (%.0f ms CPU per step)", name,
                         trainer.step, loss, 1000 * train_cpu / trainer.step)
        checkpoint = trainer.run.save(trainer.state)
        raw = heldout_loss(trainer.model.module, trainer.objective, study.heldout(),
                           Routing("dynamic"), HELDOUT_BATCH)["loss"]
        params = trainer.ema.num_params()
    finally:
        trainer.close()
    return {"overrides": list(CANDIDATES[name]), "steps": steps,
            "batch_size": cfg.train.batch_size, "checkpoint": str(checkpoint),
            "curve": curve, "heldout_loss": curve[-1]["loss"], "heldout_loss_raw": raw,
            "total_params": params, "train_cpu_seconds": train_cpu,
            "train_wall_seconds": train_wall, "cpu_ms_per_step": 1000 * train_cpu / steps}


def run_eval(study: Study, name: str, setting: Setting) -> dict:
    """Sample ``setting.num`` images as ``diffmoe sample`` does and measure them."""
    loaded = load_pretrained(study.run_dir(name), setting.weights)
    model = loaded.model
    train_cfg = study.config(name)
    settings = sampling_settings(train_cfg, {
        "sampler": setting.sampler, "steps": setting.steps, "cfg_scale": setting.cfg_scale,
        "weights": setting.weights, "num": setting.num, "batch_size": 100, "mode": "dynamic",
        "seed": 0})
    labels = torch.arange(setting.num) % 10
    start, cpu = time.perf_counter(), time.process_time()
    images, meter = generate(model, build_objective(train_cfg), labels, settings,
                             progress=False)
    sampling_s, sampling_cpu = time.perf_counter() - start, time.process_time() - cpu
    pixels = to_uint8(images)
    extractor = default_extractor(FEATURE_PRECISION)
    feats = FeatureStats.from_features(torch.cat([extractor(c) for c in pixels.split(50)]))
    metrics = compare(study.reference(), feats, kid_seed=0)
    judged = class_consistency(load_judge(), pixels, labels)
    grid = study.out / "grids" / f"{name}-{setting.name}.png"
    save_grid(images[:100], grid, nrow=10, upscale=2)
    first = class_consistency(load_judge(), pixels[:100], labels[:100])
    return {"setting": setting.__dict__, "step": loaded.step, "fid": metrics["fid"],
            "kid": metrics["kid"], "precision": metrics["precision"],
            "recall": metrics["recall"], "class_consistency": judged["class_consistency"],
            "consistency_per_class": judged["per_class"],
            "grid_consistency": first["class_consistency"], "grid": str(grid),
            "c_avg_infer": meter.summary()["c_avg_infer"], "sampling_seconds": sampling_s,
            "sampling_cpu_seconds": sampling_cpu}


def run_row(study: Study, row: str) -> None:
    kind, rest = row.split("-", 1)
    if kind == "train":
        result = run_train(study, rest)
    else:
        name, setting = split_eval(rest)
        if not study.row_path(f"train-{name}").is_file():
            raise SystemExit(f"error: {row} needs train-{name}; run that row first")
        result = run_eval(study, name, setting)
    result = {"row": row, **result, "threads": torch.get_num_threads(), "machine": machine()}
    write_json(study.row_path(row), result)
    log.info("row %s done", row)


def split_eval(rest: str) -> tuple[str, Setting]:
    for key, setting in {**SETTINGS, **EXTRA_SETTINGS}.items():
        if rest.endswith(f"-{key}") and rest[:-len(key) - 1] in CANDIDATES:
            return rest[:-len(key) - 1], setting
    raise SystemExit(f"error: no candidate and setting in 'eval-{rest}'; candidates "
                     f"{list(CANDIDATES)}, settings {list(SETTINGS) + list(EXTRA_SETTINGS)}")


def speed(names: list[str], steps: int) -> None:
    """Seconds per training step (wall and CPU) of each candidate at the current threads, and of
    one training sample grid, and the minutes a whole run would take at that speed. ``config``
    names configs/mnist_diffmoe.yaml as it is (what ``make demo`` trains)."""
    study = Study(ROOT / "runs" / "demo-recipe-speed")
    for name in names:
        if name == "config":
            cfg = load_config(BASE_CONFIG, [f"train.out_dir={study.run_dir(name)}",
                                             f"train.num_threads={torch.get_num_threads()}"])
        else:
            cfg = study.config(name)
        shutil.rmtree(study.run_dir(name), ignore_errors=True)
        trainer = Trainer(cfg)
        try:
            for _ in range(10):
                trainer.train_step()
            trainer.settle()
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            trainer.settle()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            grid_wall = time.perf_counter()
            trainer.sample_grid()
            grid_wall = time.perf_counter() - grid_wall
        finally:
            trainer.close()
        shutil.rmtree(study.run_dir(name), ignore_errors=True)
        t = cfg.train
        grids = -(-t.steps // t.sample_every)  # every sample_every steps, and at the end
        sys.stdout.write(json.dumps({
            "candidate": name, "threads": torch.get_num_threads(), "steps_timed": steps,
            "wall_ms_per_step": 1000 * wall / steps, "cpu_ms_per_step": 1000 * cpu / steps,
            "grid_seconds": grid_wall, "train_steps": t.steps, "grids": grids,
            "run_minutes_at_this_speed": (t.steps * wall / steps + grids * grid_wall) / 60})
            + "\n")


def report(study: Study) -> str:
    """The Markdown tables of docs/demo.md from the finished rows: one line per trained
    candidate (its unguided and guided rows), then every other sampling setting evaluated."""
    def load(row: str) -> Optional[dict]:
        path = study.row_path(row)
        return json.loads(path.read_text()) if path.is_file() else None

    def pct(ev: Optional[dict]) -> str:
        return "" if ev is None else f"{100 * ev['class_consistency']:.1f}%"

    def fid(ev: Optional[dict]) -> str:
        return "" if ev is None else f"{ev['fid']:.1f}"

    lines = ["| candidate | changes from `old` | steps | CPU min | held-out loss (EMA / raw) | "
             "FID, cfg 1 | consistency, cfg 1 | consistency, cfg 4 |", "|---" * 8 + "|"]
    extra = ["| candidate | sampling | FID | consistency |", "|---|---|---|---|"]
    for name, overrides in CANDIDATES.items():
        train = load(f"train-{name}")
        if train is None:
            continue
        changes = ", ".join(f"`{o}`" for o in overrides) or "(the demo before this study)"
        lines.append(
            f"| {name} | {changes} | {train['steps']} | {train['train_cpu_seconds'] / 60:.1f} | "
            f"{train['heldout_loss']:.4f} / {train['heldout_loss_raw']:.4f} | "
            f"{fid(load(f'eval-{name}-unguided'))} | {pct(load(f'eval-{name}-unguided'))} | "
            f"{pct(load(f'eval-{name}-guided'))} |")
        for key, setting in EXTRA_SETTINGS.items():
            ev = load(f"eval-{name}-{key}")
            if ev is not None:
                extra.append(f"| {name} | {setting.name} | "
                             f"{fid(ev) if setting.num >= 1000 else ''} | {pct(ev)} |")
    judge = judge_metadata().get("test_accuracy")
    return "\n".join(lines + [""] + extra + [
        "", f"The judge reads {100 * judge:.2f}% of the 10,000 MNIST test digits right.", ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-recipe")
    p.add_argument("--rows", nargs="*", help="fnmatch patterns of the rows to run (default all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--list", action="store_true")
    p.add_argument("--report", action="store_true")
    p.add_argument("--speed", action="append", help="time this candidate's training steps")
    p.add_argument("--steps", type=int, default=60, help="--speed: steps timed")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    study = Study(args.out)
    if args.speed:
        speed(args.speed, args.steps)
        return
    plan = rows() if not args.rows else list(dict.fromkeys(
        r for pat in args.rows for r in rows() + extra_rows() if fnmatch.fnmatch(r, pat)))
    if args.list or args.report:
        if args.list:
            for r in plan:
                sys.stdout.write(f"{'done' if study.row_path(r).is_file() else 'todo'}  {r}\n")
        if args.report:
            sys.stdout.write(report(study))
        return
    for row in plan:
        if not study.row_path(row).is_file():
            log.info("row %s: starting", row)
            run_row(study, row)


def extra_rows() -> list[str]:
    return [f"eval-{n}-{s}" for n in CANDIDATES for s in EXTRA_SETTINGS]


if __name__ == "__main__":
    main()
