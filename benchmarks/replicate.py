"""The paper's comparisons (PAPER.md §7: Tables 3, 4, 10, 13) at CPU scale on MNIST, resumable
row by row, and three measurements beyond the paper (the predictor's own routing, the sampling
batch, routing stability along the trajectory). docs/replication.md shows and discusses the
results.

    python benchmarks/replicate.py [--out runs/replicate] [--quick | --long] [--rows PATTERN ...]
                                   [--budget-minutes M] [--workers 2] [--threads 1]
                                   [--list] [--report]
    python benchmarks/replicate.py --verify ROW [--out runs/replicate]

Every row is one unit of work that writes its result, ``OUT/rows/<row>.json``, atomically when it
is done; a rerun skips finished rows, so an interrupted study continues where it stopped.
``--workers`` processes (default 2, of ``--threads`` 1 each: on 2 cores the small models run
better as two single-threaded processes than as one with two threads, and far better when other
work shares the machine) take rows in plan order, each row claimed by a lock file.
``--rows`` runs the rows matching the patterns (fnmatch, e.g. 'train-*-s0' or
'eval-diffmoe-e8-*') and what they need; ``--budget-minutes`` starts no row after that many
minutes (run it again to continue); ``--list`` shows the plan and what is done; ``--report``
only rebuilds the tables and figures (``OUT/report``) from the finished rows, which every run
also does at its end. ``--verify ROW`` runs a finished row (and the rows it needs) again in
``OUT/verify`` and compares every number it measured with the stored one (a row that samples
the checkpoint kept at step N retrains only the first N steps). ``--quick`` is a
smaller study (one seed, short training, 500-sample FIDs) for a smoke check in about 8 minutes
on 2 cores, written to ``OUT`` (default runs/replicate-quick). ``--long`` is the longer-horizon
study (:data:`LONG`: Dense-1x, DiffMoE-E8, EC-MoE-E8 and Dense-3x trained 10,000 steps, 3 seeds,
each evaluated from checkpoints kept at 2,000, 5,000 and 10,000 steps), written to
runs/replicate-long; about 4 hours on 2 cores (80 min a seed on an AMD EPYC), so run it in
parts with ``--budget-minutes``.

Rows:

* ``train-<model>-s<seed>``: trains one model of :data:`MODELS` with the library's Trainer from
  ``configs/mnist_diffmoe.yaml`` with the architecture and schedule pinned in :data:`TRAIN_RECIPE`
  (D=96, depth 4, patch 4; MoE in blocks 1 and 3),
  the same steps, batch and schedule for every model, and records the held-out flow-matching loss
  of its EMA weights along the way (``diffmoe/evaluation/heldout.py``: fixed test images, grid of
  t and noise).
* ``eval-<model>-s<seed>-<mode>[-at<step>]``: samples ``fid_num`` images (balanced labels, no
  guidance as in the paper's comparisons, Euler, one fixed starting noise per image shared by
  every row, sampling batch 64) with the MoE inference ``mode`` from the last checkpoint (or the
  one kept at ``step``), and measures FID against the MNIST test split, KID,
  precision/recall, C_avg_infer (Eq. 15), activated parameters (Eq. 40), the MNIST judge's class
  consistency, the held-out loss in that mode, and times.
* ``sweep-<model>-s0-g<gamma>``: the same at one constant threshold γ (interval search, Eq. 16).
* ``batch-<model>-s0-<mode>-b<B>``: the same at sampling batch B (the paper's Table 13).
* ``stability-<model>-s0``: for each mode, the share of tokens whose set of experts changes from
  one sampling step to the next, per MoE layer, over t.

FIDs use the standard FID Inception under bfloat16 autocast (``inception.FEATURE_PRECISIONS``),
for reference and samples alike: several times faster on this CPU, and on MNIST within 0.1 of the
fp32 FID (docs/evaluation.md). Every row runs with a fixed number of threads (recorded in
its result), so a row rerun on the same machine with as many threads gives the same numbers.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from common import machine
from replicate_report import eval_id, write_report

from diffmoe.capacity import CapacityMeter, activated_params
from diffmoe.config import Config, load_config
from diffmoe.data import build_dataset, to_uint8
from diffmoe.diffusion import build_objective, sample
from diffmoe.evaluation.heldout import HeldOutSet, heldout_loss
from diffmoe.evaluation.inception import default_extractor
from diffmoe.evaluation.metrics import FeatureStats, compare
from diffmoe.evaluation.mnist_judge import class_consistency, load_judge
from diffmoe.evaluation.reference import dataset_reference
from diffmoe.fileio import write_json
from diffmoe.hub import load_model
from diffmoe.images import save_grid
from diffmoe.models import DiT
from diffmoe.models.moe import Routing
from diffmoe.paths import DirectoryLock, LockHeld
from diffmoe.train import Trainer

log = logging.getLogger("replicate")
ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "mnist_diffmoe.yaml"
FEATURE_PRECISION = "bf16"
FEATURE_BATCH = 10  # images per Inception forward (smaller batches ran faster on this CPU)
NOISE_SEED = 1234  # the starting noise of every sampled image, shared by all rows
HELDOUT_SEED = 4321  # the held-out set's noise


@dataclass(frozen=True)
class Scale:
    """How large the study is."""

    name: str
    steps: int  # training steps of every model
    seeds: tuple[int, ...]
    fid_num: int  # generated images per FID (balanced over the 10 classes)
    ref_num: int  # MNIST test images in the FID reference
    sample_steps: int  # Euler steps
    sample_batch: int  # the sampling batch (DiffMoE's pool) of the comparison rows
    heldout_images: int  # test images of the held-out loss (final, per mode)
    heldout_times: int  # its grid of t
    curve_points: int  # held-out loss measurements along training
    curve_images: int  # test images of those
    gammas: tuple[float, ...]  # interval search
    batch_sizes: tuple[int, ...]  # the sampling-batch study
    stability_num: int  # images sampled for routing stability
    train: tuple[str, ...] = ()  # config overrides of every training run
    model: tuple[str, ...] = ()  # model overrides of every row (sizes for the tiny scale)
    grid_num: int = 100  # images in each seed-0 sample grid
    # The models of the study and the modes each is evaluated in (every model of MODELS in its
    # own modes when empty).
    models: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Training steps whose checkpoints are kept and evaluated (the last step only when empty).
    eval_steps: tuple[int, ...] = ()
    analyses: bool = True  # the interval search, sampling-batch and stability rows

    def model_modes(self) -> dict[str, tuple[str, ...]]:
        return dict(self.models) if self.models else {k: m.modes for k, m in MODELS.items()}

    def checkpoint_steps(self) -> tuple[int, ...]:
        return self.eval_steps or (self.steps,)


# Pinned here, not taken from the demo's config, so that a change of the demo leaves the study's
# rows comparable: the demo's width, depth and patch (MoE in blocks 1 and 3) and learning rate,
# but the paper's uniform training times.
TRAIN_RECIPE = ("model.depth=4", "model.hidden_size=96", "model.num_heads=4",
                "model.patch_size=4", "model.final_conv=false", "model.class_dropout=0.1",
                "model.moe.interleave=true", "objective.time_sampling=uniform",
                "objective.logit_mean=0.0", "objective.logit_std=1.0",
                "train.batch_size=32", "train.lr=3e-3", "train.lr_schedule=cosine",
                "train.ema_decay=0.995", "train.ema_warmup=true", "train.max_minutes=0",
                "train.keep_checkpoints=1")
FULL = Scale("full", steps=2000, seeds=(0, 1, 2), fid_num=2000, ref_num=10000, sample_steps=20,
             sample_batch=64, heldout_images=512, heldout_times=8, curve_points=8,
             curve_images=128, gammas=(0.9, 0.5, 0.1, 1e-3), batch_sizes=(1, 4, 16, 64),
             stability_num=128, train=TRAIN_RECIPE + ("train.warmup_steps=200",))
QUICK = replace(FULL, name="quick", steps=150, seeds=(0,), fid_num=500, ref_num=2000,
                sample_steps=10, heldout_images=256, heldout_times=4, curve_points=3,
                curve_images=128, gammas=(0.5, 0.01), batch_sizes=(4, 64), stability_num=64,
                train=TRAIN_RECIPE + ("train.warmup_steps=20",))
# For the test of the machinery only (tests/test_replicate.py): a toy model, seconds.
TINY = replace(FULL, name="tiny", steps=3, seeds=(0,), fid_num=8, ref_num=8, sample_steps=2,
               sample_batch=4, heldout_images=8, heldout_times=2, curve_points=1, curve_images=4,
               gammas=(0.5,), batch_sizes=(2, 4), stability_num=4, grid_num=4,
               train=TRAIN_RECIPE + ("train.warmup_steps=1", "data.limit=64"),
               model=("model.hidden_size=32", "model.depth=2", "model.num_heads=2",
                      "model.patch_size=8"))
# Issue 37: does the picture change with training? Four models, five times the steps, the
# learning-rate schedule stretched with them (warm-up 10% of the steps, cosine to the end), the
# held-out loss at 10 points and the sampling metrics at 2,000, 5,000 and 10,000 steps. 1,000
# images per FID (FULL: 2,000) halves the cost of the 45 sampling rows (~2.5 min each); FIDs of
# the two scales are therefore not comparable to each other, only within a scale.
LONG_MODELS = (("dense-1x", ("static",)), ("diffmoe-e8", ("dynamic", "static")),
               ("ec-e8", ("static",)), ("dense-3x", ("static",)))
LONG = replace(FULL, name="long", steps=10000, fid_num=1000, curve_points=10,
               train=TRAIN_RECIPE + ("train.warmup_steps=1000", "train.keep_checkpoints=3"),
               models=LONG_MODELS, eval_steps=(2000, 5000, 10000), analyses=False)
# The long study's machinery at the toy size of TINY (tests/test_replicate.py).
TINY_LONG = replace(TINY, name="tiny-long", steps=4, curve_points=2,
                    train=TINY.train + ("train.keep_checkpoints=3",),
                    models=(("dense-1x", ("static",)), ("diffmoe-e8", ("dynamic", "static"))),
                    eval_steps=(2, 4), analyses=False)
SCALES = {s.name: s for s in (FULL, QUICK, TINY, LONG, TINY_LONG)}


@dataclass(frozen=True)
class Model:
    label: str  # as the tables name it
    overrides: tuple[str, ...]
    modes: tuple[str, ...]  # evaluated on every seed; the first is the model's Table 3 mode
    analysed: bool = False  # the checkpoint of the sweep, batch and stability rows (seed 0)


DIFFMOE = ("model.moe.type=diffmoe", "model.moe.capacity=1.0")
MODELS = {
    "dense-1x": Model("Dense-1x", ("model.moe.type=dense",), ("static",)),
    "tc-e8": Model("TC-MoE-E8", ("model.moe.type=token_choice", "model.moe.num_experts=8"),
                   ("static",)),
    # EC-MoE: expert choice within each sample. Trained with the capacity predictor beside it
    # (pool_scope: sample), which never changes the diffusion model (stop-gradient), so that
    # static inference is EC-MoE (Table 3) and dynamic inference is Table 4's "EC with local
    # dynamic routing", both on the same weights.
    "ec-e8": Model("EC-MoE-E8", DIFFMOE + ("model.moe.num_experts=8",
                                           "model.moe.pool_scope=sample"), ("static", "dynamic")),
    "diffmoe-e4": Model("DiffMoE-E4", DIFFMOE + ("model.moe.num_experts=4",), ("dynamic",)),
    "diffmoe-e8": Model("DiffMoE-E8", DIFFMOE + ("model.moe.num_experts=8",),
                        ("dynamic", "static", "predictor"), analysed=True),
    # About 3x the activated parameters of Dense-1x: width 168 instead of 96 (head width 24).
    "dense-3x": Model("Dense-3x", ("model.moe.type=dense", "model.hidden_size=168",
                                   "model.num_heads=7"), ("static",)),
}
STABILITY_MODES = ("dynamic", "predictor", "static")


@dataclass(frozen=True)
class Row:
    id: str
    kind: str  # train | eval | sweep | batch | stability
    model: str
    seed: int
    mode: str = "static"
    gamma: Optional[float] = None
    batch: Optional[int] = None
    at: Optional[int] = None  # the training step of the checkpoint sampled (None: the last)

    @property
    def needs(self) -> Optional[str]:
        return None if self.kind == "train" else train_id(self.model, self.seed)

    @property
    def routing(self) -> Routing:
        return Routing(self.mode, 0.5 if self.gamma is None else self.gamma)


def train_id(model: str, seed: int) -> str:
    return f"train-{model}-s{seed}"


def plan(scale: Scale) -> list[Row]:
    """Every row, in the order they run: seed 0 of every model first (then the analyses of its
    checkpoint), so that a partial study already holds one complete seed. With
    ``scale.eval_steps``, each model is evaluated at each of those steps (ids ending
    ``-at<step>``)."""
    rows = []
    for seed in scale.seeds:
        for name, modes in scale.model_modes().items():
            rows.append(Row(train_id(name, seed), "train", name, seed))
            rows += [Row(eval_id(name, seed, mode, at), "eval", name, seed, mode, at=at)
                     for at in (scale.eval_steps or (None,)) for mode in modes]
        if seed == scale.seeds[0] and scale.analyses:
            rows += analysis_rows(scale, seed)
    return rows


def analysis_rows(scale: Scale, seed: int) -> list[Row]:
    name = next(n for n, m in MODELS.items() if m.analysed)
    rows = [Row(f"sweep-{name}-s{seed}-g{g:g}", "sweep", name, seed, "threshold", gamma=g)
            for g in scale.gammas]
    rows += [Row(f"batch-{name}-s{seed}-{mode}-b{b}", "batch", name, seed, mode, batch=b)
             for mode in STABILITY_MODES for b in scale.batch_sizes if b != scale.sample_batch]
    rows.append(Row(f"stability-{name}-s{seed}", "stability", name, seed))
    return rows


# -- the shared parts ------------------------------------------------------------------------

@dataclass
class Study:
    """What every row shares: the scale, the output folder, and (built on first use) the
    held-out sets, the labels and starting noise of the samples, the FID reference, the judge."""

    scale: Scale
    out: Path
    cache_dir: Optional[str] = None
    # uint8 images → features, for FID; None: the FID Inception in bf16 (a test passes a toy one).
    extractor: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # Training rows stop at this step (None: at ``scale.steps``). Only ``--verify`` sets it: the
    # schedule still spans ``scale.steps``, so the first N steps are those of the full run.
    train_until: Optional[int] = None
    _cache: dict = field(default_factory=dict)

    def shared(self, key: str, make: Callable):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def heldout(self, final: bool) -> HeldOutSet:
        num = self.scale.heldout_images if final else self.scale.curve_images
        return self.shared(f"heldout{num}", lambda: HeldOutSet.build(
            build_dataset("mnist", "test"), num, self.scale.heldout_times, HELDOUT_SEED))

    def labels_and_noise(self, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.scale.fid_num
        return self.shared("noise", lambda: (torch.arange(n) % 10, torch.randn(
            (n, channels, size, size), generator=torch.Generator().manual_seed(NOISE_SEED))))

    def features(self, pixels: torch.Tensor) -> FeatureStats:
        extractor = self.extractor or default_extractor(FEATURE_PRECISION)
        return FeatureStats.from_features(torch.cat([extractor(c) for c in
                                                     pixels.split(FEATURE_BATCH)]))

    def reference(self) -> FeatureStats:
        """The first ``ref_num`` images of the MNIST test split, cached by the library."""
        if self.extractor is not None:
            return self.shared("reference", lambda: self.features(
                build_dataset("mnist", "test").images[:self.scale.ref_num]))
        return self.shared("reference", lambda: dataset_reference(
            "mnist:test", self.scale.ref_num, self.cache_dir, progress=False,
            precision=FEATURE_PRECISION).stats)

    def row_path(self, row_id: str) -> Path:
        return self.out / "rows" / f"{row_id}.json"

    def run_dir(self, model: str, seed: int) -> Path:
        return self.out / "runs" / f"{model}-s{seed}"

    def config(self, model: str, seed: int) -> Config:
        s = self.scale
        overrides = [*s.train, *s.model, *MODELS[model].overrides,
                     f"train.out_dir={self.run_dir(model, seed)}", f"train.seed={seed}",
                     f"train.steps={s.steps}", f"train.log_every={s.steps}",
                     f"train.ckpt_every={s.steps}", f"train.sample_every={s.steps}",
                     f"train.num_threads={torch.get_num_threads()}", "sample.sampler=euler",
                     f"sample.steps={s.sample_steps}", "sample.cfg_scale=1.0",
                     f"sample.batch_size={s.sample_batch}"]
        return load_config(BASE_CONFIG, overrides)


# -- training rows ---------------------------------------------------------------------------

def run_train(study: Study, row: Row) -> dict:
    """Train one model, its held-out loss measured along the way; the checkpoint stays in the
    row's run folder for the rows that sample it."""
    cfg = study.config(row.model, row.seed)
    run_dir = study.run_dir(row.model, row.seed)
    if run_dir.exists():  # an interrupted attempt at this row: the row starts again
        shutil.rmtree(run_dir)
    s = study.scale
    points = {round(s.steps * (i + 1) / s.curve_points) for i in range(s.curve_points)}
    last = study.train_until or cfg.train.steps
    kept = set(s.checkpoint_steps()) - {last}  # the last is saved when training ends
    routing = Routing(s.model_modes()[row.model][0])
    curve, checkpoints, eval_s = [], {}, 0.0
    start, cpu = time.perf_counter(), time.process_time()
    trainer = Trainer(cfg)
    try:
        objective = trainer.objective
        while trainer.step < last:
            trainer.train_step()
            if trainer.step in points:
                trainer.settle()
                t0 = time.perf_counter()
                loss = heldout_loss(trainer.ema, objective, study.heldout(final=False),
                                    routing, s.sample_batch)
                eval_s += time.perf_counter() - t0
                curve.append({"step": trainer.step, "loss": loss["loss"]})
                log.info("%s step %d: held-out loss %.5f", row.id, trainer.step, loss["loss"])
            if trainer.step in kept:
                trainer.settle()
                checkpoints[str(trainer.step)] = str(trainer.run.save(trainer.state))
        trainer.settle()
        checkpoint = trainer.run.save(trainer.state)
        checkpoints[str(trainer.step)] = str(checkpoint)
        model = trainer.ema
        params = {"total_params": model.num_params(),
                  "activated_params_c1": activated_params(model, 1.0)}
    finally:
        trainer.close()
    wall = time.perf_counter() - start
    return {"steps": trainer.step, "checkpoint": str(checkpoint), "checkpoints": checkpoints,
            "curve": curve,
            "curve_mode": routing.mode, **params, "train_seconds": wall - eval_s,
            "heldout_seconds": eval_s, "cpu_seconds": time.process_time() - cpu}


# -- sampling rows ---------------------------------------------------------------------------

def load_trained(study: Study, row: Row) -> tuple[DiT, object]:
    """The EMA model of the row's training run: its last checkpoint, or the one kept at step
    ``row.at``."""
    source = study.run_dir(row.model, row.seed)
    if row.at is not None:
        kept = json.loads(study.row_path(row.needs).read_text())["checkpoints"]
        source = Path(kept[str(row.at)])
    model = load_model(source)
    return model.eval(), build_objective(study.config(row.model, row.seed))


def generate_set(model: DiT, objective, labels: torch.Tensor, noise: torch.Tensor,
                 routing: Routing, batch: int, steps: int, on_forward) -> torch.Tensor:
    """One image per label, ``batch`` at a time, each from its own starting noise (so an image
    is the same whatever batch it is drawn in, unless the routing makes it depend on the
    batch)."""
    chunks = []
    for i in range(0, labels.shape[0], batch):
        chunks.append(sample(model, objective, labels[i:i + batch], sampler="euler",
                             steps=steps, cfg_scale=1.0, routing=routing,
                             on_forward=on_forward, noise=noise[i:i + batch]))
    images = torch.cat(chunks)
    if not bool(torch.isfinite(images).all()):
        raise RuntimeError("the samples came out non-finite")
    return images


def run_sampling(study: Study, row: Row) -> dict:
    """Sample the FID set in the row's mode (and γ, batch) and measure it."""
    s = study.scale
    model, objective = load_trained(study, row)
    labels, noise = study.labels_and_noise(model.cfg.in_channels, model.cfg.input_size)
    batch = row.batch or s.sample_batch
    meter = CapacityMeter()
    start, cpu = time.perf_counter(), time.process_time()
    images = generate_set(model, objective, labels, noise, row.routing, batch, s.sample_steps,
                          meter.on_forward)
    sampling_s = time.perf_counter() - start
    pixels = to_uint8(images)
    metrics = compare(study.reference(), study.features(pixels), kid_seed=0)
    judged = class_consistency(load_judge(), pixels, labels)
    heldout = heldout_loss(model, objective, study.heldout(final=True), row.routing, batch)
    if row.seed == s.seeds[0] and row.kind == "eval":
        save_grid(images[:s.grid_num], study.out / "grids" / f"{row.id}.png", nrow=10,
                  upscale=2)
    c_avg = meter.c_avg()
    return {"mode": row.mode, "gamma": row.gamma, "batch": batch, "num": labels.shape[0],
            "fid": metrics["fid"], "kid": metrics["kid"], "precision": metrics["precision"],
            "recall": metrics["recall"], "c_avg_infer": c_avg,
            "capacity_per_layer": meter.summary()["per_layer"],
            "activated_params": activated_params(model, c_avg),
            "total_params": model.num_params(),
            "class_consistency": judged["class_consistency"],
            "consistency_per_class": judged["per_class"],
            "heldout_loss": heldout["loss"], "heldout_per_t": heldout["per_t"],
            "heldout_times": heldout["times"], "sampling_seconds": sampling_s,
            "images_per_second": labels.shape[0] / sampling_s,
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}


# -- routing stability -----------------------------------------------------------------------

class MaskRecorder:
    """The sampler's forward hook: each MoE layer's selection mask (S, E) at every step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.masks: list[list[torch.Tensor]] = []

    def __call__(self, t: float, out) -> None:
        self.times.append(t)
        self.masks.append([o.selection_mask().clone() for o in out.layers
                           if o.counts_E is not None])

    def changes(self) -> dict:
        """For each step after the first, per layer: the share of tokens whose set of experts
        differs from the previous step's, and the share processed by no expert."""
        changed, unrouted = [], []
        for prev, cur in zip(self.masks[:-1], self.masks[1:]):
            changed.append([float((a != b).any(1).float().mean()) for a, b in zip(prev, cur)])
            unrouted.append([float((~b.any(1)).float().mean()) for b in cur])
        return {"times": self.times[1:], "changed": changed, "unrouted": unrouted}


def run_stability(study: Study, row: Row) -> dict:
    """Routing stability along the trajectory, in each mode, on the first images of the FID set
    (sampled in batches of ``sample_batch``, one batch after another)."""
    s = study.scale
    model, objective = load_trained(study, row)
    labels, noise = study.labels_and_noise(model.cfg.in_channels, model.cfg.input_size)
    n = s.stability_num
    start, cpu = time.perf_counter(), time.process_time()
    result = {}
    for mode in STABILITY_MODES:
        per_batch = []
        for i in range(0, n, s.sample_batch):
            recorder = MaskRecorder()
            generate_set(model, objective, labels[i:min(n, i + s.sample_batch)],
                         noise[i:min(n, i + s.sample_batch)], Routing(mode), s.sample_batch,
                         s.sample_steps, recorder)
            per_batch.append(recorder.changes())
        result[mode] = mean_changes(per_batch)
    return {"num": n, "modes": result, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu}


def mean_changes(parts: list[dict]) -> dict:
    """The per-step, per-layer shares averaged over sampling batches (equal sizes)."""
    out = {"times": parts[0]["times"]}
    for key in ("changed", "unrouted"):
        out[key] = torch.tensor([p[key] for p in parts]).mean(0).tolist()
    return out


# -- running the plan ------------------------------------------------------------------------

RUNNERS = {"train": run_train, "eval": run_sampling, "sweep": run_sampling,
           "batch": run_sampling, "stability": run_stability}


def run_row(study: Study, row: Row) -> dict:
    log.info("row %s: starting", row.id)
    result = RUNNERS[row.kind](study, row)
    result = {"row": row.id, **{k: v for k, v in asdict(row).items() if k != "id"}, **result,
              "threads": torch.get_num_threads(), "scale": study.scale.name}
    write_json(study.row_path(row.id), result)
    log.info("row %s: done in %.0f s", row.id, result.get("cpu_seconds", 0.0))
    return result


def selected(rows: list[Row], patterns: Optional[list[str]]) -> list[Row]:
    """The rows matching ``patterns`` (all without), with the training rows they need."""
    if not patterns:
        return rows
    chosen = {r.id for r in rows if any(fnmatch.fnmatch(r.id, p) for p in patterns)}
    if not chosen:
        raise SystemExit(f"error: no row matches {patterns}; see --list")
    chosen |= {r.needs for r in rows if r.id in chosen and r.needs}
    return [r for r in rows if r.id in chosen]


def run_plan(study: Study, rows: list[Row], budget_minutes: float, poll_s: float = 10.0
             ) -> int:
    """Run every row of ``rows`` not yet done, in order, until the budget is spent; returns how
    many are still to do. Several processes may run one plan at once: each row is claimed with
    a lock file (``OUT/claims``; the kernel lets go of a dead process's lock), a row runs once
    the training row it needs is done, and a process with nothing to take waits for the
    others."""
    start = time.perf_counter()
    (study.out / "claims").mkdir(parents=True, exist_ok=True)
    while True:
        todo = [r for r in rows if not study.row_path(r.id).is_file()]
        if not todo:
            return 0
        if budget_minutes and time.perf_counter() - start > 60 * budget_minutes:
            log.info("budget of %.0f min spent; %d rows left (run again to continue)",
                     budget_minutes, len(todo))
            return len(todo)
        if not run_next(study, todo):
            time.sleep(poll_s)  # every row left is running elsewhere or waits for one that is


def check_scale(study: Study) -> None:
    """Rows of one study folder come from one scale: the first run records it in
    ``OUT/scale.json``; a run at another scale (or after the scale was edited) stops in one line
    before any work, since its rows would be skipped as done or mixed with others."""
    record = study.out / "scale.json"
    configs = {}
    for name in MODELS:  # as resolved, so that an edit of the base config is caught too
        cfg = study.config(name, 0).to_dict()
        cfg["train"] = {k: v for k, v in cfg["train"].items()
                        if k not in ("out_dir", "num_threads", "seed")}
        configs[name] = cfg
    now = json.loads(json.dumps({"scale": asdict(study.scale),
                                 "models": {k: asdict(m) for k, m in MODELS.items()},
                                 "configs": configs}))
    if not record.is_file():
        write_json(record, now)
        return
    before = json.loads(record.read_text())
    if before != now:
        changed = sorted(k for k in {**before["scale"], **now["scale"]}
                         if before["scale"].get(k) != now["scale"].get(k))
        what = ", ".join(changed) or ("the models" if before.get("models") != now["models"]
                                      else "the models' configs")
        raise SystemExit(f"error: {study.out} holds rows of another scale (differs in {what}); "
                         f"pass another --out, or move that folder away to start again")


def run_next(study: Study, todo: list[Row]) -> bool:
    """Claim and run the first row of ``todo`` whose training row is done; False if none."""
    waiting = {r.id for r in todo}
    for row in todo:
        if row.needs in waiting:
            continue
        lock = DirectoryLock(study.out / "claims" / f"{row.id}.lock")
        try:
            lock.acquire()
        except LockHeld:
            continue
        try:
            if not study.row_path(row.id).is_file():  # not finished while we looked
                run_row(study, row)
        finally:
            lock.release()
        return True
    return False


def run_workers(args: argparse.Namespace, scale: Scale, out: Path) -> int:
    """``--workers N``: N processes of this script, ``--threads`` each, share the plan."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out),
               "--scale", scale.name, "--threads", str(args.threads),
               "--budget-minutes", str(args.budget_minutes)]
    command += ["--rows", *args.rows] if args.rows else []
    command += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    procs = [subprocess.Popen(command) for _ in range(args.workers)]
    return max(p.wait() for p in procs)


MEASURED_SKIP = ("seconds", "cpu_seconds", "train_seconds", "heldout_seconds",
                 "sampling_seconds", "images_per_second", "checkpoint", "checkpoints")


def verify(study: Study, rows: list[Row], row_id: str) -> bool:
    """Run ``row_id`` (and what it needs) again in OUT/verify and compare its numbers with the
    stored result (times aside). A row that samples the checkpoint kept at step N reruns only
    the first N steps of its training."""
    stored = json.loads(study.row_path(row_id).read_text())
    torch.set_num_threads(stored["threads"])  # the numbers depend on the thread count
    again = Study(study.scale, study.out / "verify", study.cache_dir, study.extractor,
                  train_until=stored.get("at"))
    if again.out.exists():
        shutil.rmtree(again.out)
    run_plan(again, selected(rows, [row_id]), 0)
    fresh = json.loads(again.row_path(row_id).read_text())
    differ = {k: (stored[k], fresh.get(k)) for k in stored
              if k not in MEASURED_SKIP and stored[k] != fresh.get(k)}
    for key, (a, b) in differ.items():
        log.warning("%s: %s differs: stored %s, rerun %s", row_id, key, a, b)
    log.info("%s: rerun %s the stored numbers", row_id,
             "reproduces" if not differ else "does NOT reproduce")
    return not differ


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="the smoke-check scale (~8 min on 2 cores)")
    p.add_argument("--long", action="store_true",
                   help="the longer-horizon study: 4 models, 10,000 steps, evaluated at 2,000, "
                        "5,000 and 10,000 (about 4 h on 2 cores)")
    p.add_argument("--scale", choices=list(SCALES), help=argparse.SUPPRESS)
    p.add_argument("--rows", nargs="+", help="fnmatch patterns of the rows to run")
    p.add_argument("--budget-minutes", type=float, default=0.0,
                   help="start no row after this many minutes (0: no limit)")
    p.add_argument("--workers", type=int, default=2, help="processes sharing the plan")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    p.add_argument("--cache-dir", help="FID reference cache (default: the library's)")
    p.add_argument("--list", action="store_true", help="show the plan and what is done")
    p.add_argument("--report", action="store_true", help="only rebuild the report")
    p.add_argument("--verify", metavar="ROW", help="rerun a finished row and compare")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.quick and args.long:
        raise SystemExit("error: --quick and --long are two studies; pass one of them")
    scale = SCALES[args.scale or ("quick" if args.quick else "long" if args.long else "full")]
    out = args.out or ROOT / "runs" / ("replicate" if scale is FULL else f"replicate-{scale.name}")
    torch.set_num_threads(args.threads)
    study = Study(scale, out, args.cache_dir)
    rows = plan(scale)
    check_scale(study)
    if args.list:
        for r in rows:
            sys.stdout.write(f"{'done' if study.row_path(r.id).is_file() else '    '}  {r.id}\n")
        return 0
    if args.verify:
        return 0 if verify(study, rows, args.verify) else 1
    todo, left = selected(rows, args.rows), 0
    if args.worker or args.workers == 1:
        left = run_plan(study, todo, args.budget_minutes)
        if args.worker:
            return 3 if left else 0
    elif not args.report:
        if any(r.kind != "train" for r in todo):
            torch.set_num_threads(args.workers * args.threads)
            study.reference()  # once, before the workers would each compute it
        left = run_workers(args, scale, out)
    write_report(out, rows, scale, MODELS, machine())
    return 3 if left else 0


if __name__ == "__main__":
    sys.exit(main())
