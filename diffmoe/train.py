"""The training loop: single process on CPU/GPU, or data-parallel under ``torchrun`` (DDP, or
FSDP2 with ``train.parallel=fsdp``), with gradient accumulation (``train.grad_accum``),
activation checkpointing and bf16 autocast from the config.

:class:`Trainer` builds the parts and runs the loop; one step is :meth:`Trainer.train_step`.
The run directory (start or resume, checkpoints, metrics, RNG state) is :mod:`diffmoe.run`;
what stops a run (SIGTERM, a lost rank, a non-finite loss) is put in words by
:mod:`diffmoe.faults`; the model handle and its wrappers are :mod:`diffmoe.parallel`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch._guards import detect_fake_mode
from tqdm import tqdm

from . import distributed, faults, parallel
from .capacity import expert_capacities
from .config import Config, SampleConfig, TrainConfig, config_with
from .config.schedule import learning_rate
from .data import BatchIterator, ImageDataset, build_training_dataset, sample_decoder
from .device import autocast, resolve_device, use_deterministic, use_tf32
from .diffusion import build_objective
from .ema import ema_decay, make_ema, update_ema
from .errors import ConfigError
from .images import GRID_COLUMNS
from .loss import TrainingLoss, training_loss
from .models import build_model
from .models.moe import apply_threshold_updates, diffmoe_layers
from .models.moe.diffmoe import DiffMoE, dynamic_counts
from .run import Progress, RunDirectory, TrainingState, optimizer_settings
from .sample import generate

log = logging.getLogger(__name__)

METRIC_FIELDS = {
    # The loss fields are null for an interval whose every step was skipped.
    "step": "optimizer steps done",
    "loss": "total loss backpropagated (diffusion + aux + predictor)",
    "diffusion_loss": "objective loss: flow-matching MSE, or DDPM L_simple + vb_weight * L_vb",
    "aux_loss": "alpha-weighted token-choice balance loss (0 otherwise)",
    "predictor_bce": "weighted capacity-predictor BCE, mean over MoE layers (Eq. 12)",
    "threshold_mean": "mean DiffMoE threshold tau over layers and experts (Eq. 17), as the "
                      "step's forward saw it",
    "dynamic_capacity": "C (Eq. 9) dynamic inference would use on the training batch",
    "images_per_sec": "training throughput over the interval (all ranks)",
    "lr": "learning rate",
    "elapsed_s": "seconds since this process started training",
    "skipped_steps": "steps skipped for a non-finite loss since the run began "
                     "(train.nonfinite_loss=skip)",
}
MEAN_FIELDS = ["loss", "diffusion_loss", "aux_loss", "predictor_bce", "threshold_mean",
               "dynamic_capacity"]


def training_device(t: TrainConfig) -> torch.device:
    """``train.device`` resolved, with its settings applied: TF32 on CUDA (``train.tf32``),
    deterministic kernels (``train.deterministic``) and the CPU threads (``train.num_threads``);
    ``train.ddp_bf16_grads`` refused off CUDA."""
    device = resolve_device(t.device)
    if t.ddp_bf16_grads and device.type != "cuda":
        raise ConfigError("train.ddp_bf16_grads=true needs CUDA (torch's bf16 all-reduce hook "
                          "runs on NCCL only); unset it to train on this device")
    use_tf32(device, t.tf32)
    if t.deterministic:
        use_deterministic(device)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    return device


def build_models(cfg: Config, device: torch.device, fsdp: bool, mesh=None
                 ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model to train and its EMA on ``device``, sharded with FSDP2 over ``mesh`` if
    ``fsdp``: built on the meta device, sharded, then filled, so that each rank allocates only
    its part, with the weights of the model built whole from ``train.seed`` (identical on every
    rank; :func:`parallel.materialize`)."""
    t = cfg.train
    torch.manual_seed(t.seed)
    if simulated := detect_fake_mode() is not None:  # diffmoe plan: fake tensors, no storage
        module = build_model(cfg.model, t.token_pool)
    else:
        module, draws = parallel.build_on_meta(
            lambda: build_model(cfg.model, t.token_pool, initialize=False))
    module.activation_checkpointing = t.activation_checkpointing
    ema = make_ema(module)
    if fsdp:
        parallel.shard(module, t.precision, t.fsdp_reduce_dtype, mesh)
        parallel.shard(ema, t.precision, t.fsdp_reduce_dtype, mesh)
    if not simulated:
        parallel.materialize(module, draws, device)
        parallel.materialize_as(ema, module, device)
    return module, ema


def check_batch_split(t: TrainConfig, world_size: int) -> None:
    if t.batch_size % (world_size * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the "
                          f"{world_size} ranks x train.grad_accum={t.grad_accum}; pick a "
                          f"multiple of their product")


def check_data_matches_model(cfg: Config, ds: ImageDataset, resuming: bool = False) -> None:
    """The data's shape is the model's. A new model is told to take the data's shape; one whose
    weights exist (a resumed or imported run) to get data of its own shape instead (never
    another architecture, which a resume refuses)."""
    m = cfg.model
    if ds.image_size != m.input_size or ds.channels != m.in_channels:
        fix = (f"set model.input_size={ds.image_size} model.in_channels={ds.channels}"
               if not resuming else _data_fix(cfg, ds))
        raise ConfigError(
            f"dataset '{ds.name}' has {ds.channels}x{ds.image_size}x{ds.image_size} images but the "
            f"model expects {m.in_channels}x{m.input_size}x{m.input_size}; {fix}")
    if m.condition == "class" and ds.num_classes > m.num_classes:
        fix = (f"set model.num_classes={ds.num_classes}" if not resuming else
               f"the checkpoint fixes the model, so give it data of at most {m.num_classes} "
               f"classes")
        raise ConfigError(f"dataset '{ds.name}' has {ds.num_classes} classes but "
                          f"model.num_classes={m.num_classes}; {fix}")


def _data_fix(cfg: Config, ds: ImageDataset) -> str:
    """What data a model with weights needs (its architecture is not to change)."""
    m = cfg.model
    if cfg.data.name != "latents":
        return (f"the checkpoint fixes the model, so give it {m.in_channels}-channel "
                f"{m.input_size}x{m.input_size} data")
    down = int(ds.index.get("downsampling", 1))
    return (f"the checkpoint fixes the model, so give it a latent cache of "
            f"{m.input_size * down}px images from a VAE with {m.in_channels} latent channels "
            f"(diffmoe cache-latents --image-size {m.input_size * down})")


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the config's hyper-parameters, using the fused kernel where torch has one for
    the parameters' device (CPU and CUDA): on a CPU it is about 9x faster than the default
    multi-tensor kernel, which matters for MoE models with many expert parameters."""
    kwargs = optimizer_settings(t)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(model.parameters(), **kwargs)


@torch.no_grad()
def step_metrics(out: TrainingLoss, layers: list[DiffMoE]) -> torch.Tensor:
    """One micro-batch's values of :data:`MEAN_FIELDS`, float64. For DiffMoE (``layers``, the
    model's, whose outputs these are) the mean threshold and the C of Eq. 9 that dynamic
    inference would spend on this batch (0 for other FFNs), read before the step moves τ."""
    outputs = [o for o in out.model_output.layers if o.threshold_targets_E is not None]
    zero = out.loss.new_zeros(())
    tau = torch.stack([m.thresholds_E.mean() for m in layers]).mean() if outputs else zero
    cap = torch.stack([
        expert_capacities(dynamic_counts(o.predictor_logits_SE, m.thresholds_E), o.num_tokens,
                          o.base_experts).mean() for o, m in zip(outputs, layers, strict=True)
    ]).mean() if outputs else zero
    return torch.stack([out.loss.detach(), out.diffusion_loss, out.aux_loss,
                        out.predictor_loss, tau, cap]).double()


def grid_conditions(cfg: Config, dataset: ImageDataset, device: torch.device,
                    classes: Optional[list[int]]):
    """What the training sample grids are conditioned on: the run's grid ``classes``, one per
    column (:attr:`RunDirectory.grid_classes`), or the captions of the dataset's first images."""
    num = cfg.sample.num
    if cfg.model.condition == "text":
        return dataset.conditions(torch.arange(num) % len(dataset))
    return torch.tensor(classes, device=device)[torch.arange(num, device=device) % len(classes)]


def grid_settings(cfg: Config, fsdp: bool) -> SampleConfig:
    """The sample grids' settings: ``sample`` of the config, in bf16 when FSDP2 gathers the EMA's
    parameters in bf16 (``train.precision=bf16``), whose forward then needs bf16 autocast."""
    if fsdp and cfg.train.precision == "bf16":
        return dataclasses.replace(cfg.sample, precision="bf16")
    return cfg.sample


def interval_record(p: Progress, t: TrainConfig, interval_start: float, timed_steps: int,
                    start_time: float) -> dict:
    """The ``metrics.jsonl`` record of the logging interval ending at step ``p.step``: the
    means over its kept steps and over ranks (a collective; null when every step was skipped),
    and the throughput of the ``timed_steps`` steps this process ran since ``interval_start``."""
    good = int(p.interval_good)
    means = distributed.all_mean(p.interval_sums / max(1, good)).tolist()
    if not good:
        means = [None] * len(means)
    return {"step": p.step, **dict(zip(MEAN_FIELDS, means)),
            "images_per_sec": timed_steps * t.batch_size / (time.perf_counter() - interval_start),
            "lr": learning_rate(p.step - 1, t), "elapsed_s": time.perf_counter() - start_time,
            "skipped_steps": p.skipped_steps}


def optimizer_step(optimizer: torch.optim.Optimizer, keep: torch.Tensor) -> None:
    """The optimizer step where ``keep`` (a 0-d bool tensor) is true. Fused AdamW decides on the
    device: it skips the update, and its step count, where its ``found_inf`` is 1 (as the AMP
    grad scaler uses it). Another optimizer waits for the host to read ``keep``."""
    if not optimizer.defaults.get("fused"):
        if bool(keep):
            optimizer.step()
        return
    optimizer.found_inf = (~keep).to(torch.float32)
    try:
        optimizer.step()
    finally:
        optimizer.found_inf = None


def time_is_up(max_minutes: float, start_time: float) -> bool:
    """``train.max_minutes`` (0: no limit) has passed on some rank, so every rank stops at this
    step; collective under torchrun."""
    if not max_minutes:
        return False
    over = time.perf_counter() - start_time > 60 * max_minutes
    return bool(distributed.all_mean(torch.tensor(float(over))) > 0)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_checkpoint: Optional[Path]
    last_samples: Optional[Path]


class Trainer:
    """One training run: :meth:`train` runs it to ``train.steps`` (or ``train.max_minutes``);
    :meth:`close` releases it (always, also after an error)."""

    def __init__(self, cfg: Config, resume: bool = False, accept_changes: bool = False):
        self.cfg = cfg
        t = cfg.train
        self.device = training_device(t)
        self.dist = distributed.setup(self.device.type, t.dist_timeout_s)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.cuda_index)
        check_batch_split(t, self.dist.world_size)
        self.run = RunDirectory(cfg, self.dist, self.device)
        self.model: Optional[parallel.TrainingModel] = None
        try:
            self._build(resume, accept_changes)
        except BaseException:
            self.close()
            raise

    def _build(self, resume: bool, accept_changes: bool) -> None:
        cfg, t, dist = self.cfg, self.cfg.train, self.dist
        resume_from = self.run.open(resume, accept_changes)
        self.dataset = build_training_dataset(cfg)
        check_data_matches_model(cfg, self.dataset, resuming=resume_from is not None)
        self.run.check_data(len(self.dataset), self.dataset.contents, self.dataset.class_names)
        self.loader = BatchIterator(self.dataset, t.batch_size // dist.world_size, t.seed,
                                    dist.rank, dist.world_size, self.device)
        self._build_step_parts(resume_from=resume_from)
        self.decoder = (sample_decoder(cfg.to_dict()["data"], self.device,  # latent grids' VAE
                                       channels=cfg.model.in_channels)
                        if dist.is_main or self.model.fsdp else None)  # the ranks that sample
        self.run.begin(self.progress.step)

    def _build_step_parts(self, mesh=None, ddp: bool = True, resume_from=None) -> None:
        cfg, t, dist = self.cfg, self.cfg.train, self.dist
        fsdp = dist.enabled and t.parallel == "fsdp"
        module, self.ema = build_models(cfg, self.device, fsdp, mesh)
        self.optimizer = build_optimizer(module, t)
        self.objective = build_objective(cfg)
        self.diffmoe_layers = diffmoe_layers(module)
        self.model = parallel.TrainingModel(module, fsdp)
        self.progress = Progress.start(len(MEAN_FIELDS), self.device)
        torch.manual_seed(t.seed + 1 + dist.rank)  # per-rank noise, timesteps, label dropout
        if resume_from is not None:
            self.run.load(resume_from, self.state)
        self.model.wrap(ddp=ddp and dist.enabled and not fsdp, compile=t.compile,
                        device=self.device, bf16_grads=t.ddp_bf16_grads)

    @property
    def state(self) -> TrainingState:
        return TrainingState(self.model, self.ema, self.optimizer, self.loader, self.progress)

    @property
    def step(self) -> int:
        return self.progress.step

    def close(self) -> None:
        """Free the DDP / compiled wrappers before the process group goes
        (:meth:`parallel.TrainingModel.release_wrappers`) and stop writing to train.log."""
        if self.model is not None:
            self.model.release_wrappers()
        self.run.close()

    def train_step(self) -> None:
        """One optimizer step, kept only if every rank's loss is finite; adds its metrics to the
        logging interval. Nothing here waits for the device (see :meth:`settle`).

        Each micro-batch is its own DiffMoE token pool; gradients of loss / grad_accum
        accumulate and are reduced across ranks on the last one only. Whether the step is kept
        (every micro-batch's loss finite on every rank) is a tensor the ranks agree on in one
        collective; the optimizer step, the thresholds (Eq. 17, once per micro-batch) and the
        EMA apply it on the device, so a non-finite loss leaves them all as they were."""
        t, p = self.cfg.train, self.progress
        x, y = self.loader.next()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(p.step, t)
        self.optimizer.zero_grad(set_to_none=True)
        micro = list(zip(x.chunk(t.grad_accum), y.chunk(t.grad_accum)))
        metrics, targets = [], []
        for i, (x_m, y_m) in enumerate(micro):
            with self.model.gradient_sync(i == len(micro) - 1):
                with autocast(t.precision, self.device):
                    out = training_loss(self.objective.loss(self.model.net, x_m, y_m),
                                        self.cfg.model.moe)
                metrics.append(step_metrics(out, self.diffmoe_layers))
                targets.append([o.threshold_targets_E for o in out.model_output.layers
                                if o.threshold_targets_E is not None])
                (out.loss / len(micro)).backward()
        metrics = torch.stack(metrics)
        keep = distributed.on_every_rank(torch.isfinite(metrics[:, 0]).all())
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.module.parameters(), t.grad_clip)
        optimizer_step(self.optimizer, keep)
        for micro_targets in targets:
            apply_threshold_updates(self.diffmoe_layers, micro_targets, keep=keep)
        update_ema(self.ema, self.model.module, ema_decay(t.ema_decay, p.step, t.ema_warmup),
                   t.ema_buffers, keep=keep)
        step_mean = metrics.mean(0)
        p.interval_sums += torch.where(keep, step_mean, 0.0)
        p.interval_good += keep
        p.step += 1
        p.unsettled.append((p.step, step_mean[0], keep))

    def settle(self) -> None:
        """Read which of the steps since the last call were kept (one host synchronisation)
        and apply ``train.nonfinite_loss`` to the others (:func:`faults.skipped_steps`). Called
        before anything is logged, sampled or saved, so that no record or checkpoint follows an
        unreported non-finite loss."""
        t, p = self.cfg.train, self.progress
        if p.unsettled:
            steps = [step for step, _, _ in p.unsettled]
            read = torch.stack([torch.stack([loss.double(), kept.double()])
                                for _, loss, kept in p.unsettled]).tolist()
            p.unsettled.clear()
            p.skipped_steps = faults.skipped_steps(
                [(step, loss, bool(kept)) for step, (loss, kept) in zip(steps, read)],
                t.nonfinite_loss, t.max_skipped_steps, p.skipped_steps,
                self.run.last_good_checkpoint)

    def _log_interval(self, interval_start: float, timed_steps: int, start_time: float) -> dict:
        """Write the interval's record and start the next interval."""
        record = interval_record(self.progress, self.cfg.train, interval_start, timed_steps,
                                 start_time)
        if self.dist.is_main:
            self.run.write_metrics(record)
            log.debug("metrics %s", record)
        self.progress.new_interval()
        return record

    def train(self) -> TrainResult:
        t, main = self.cfg.train, self.dist.is_main
        if main:
            log.info("run %s: %s, %.2fM parameters, %d ranks, device %s", self.run.path,
                     self.cfg.model.moe.type, self.model.module.num_params() / 1e6,
                     self.dist.world_size, self.device)
        self.model.net.train()
        interval_start = start_time = time.perf_counter()
        timed_steps, stop_early = 0, False
        last_ckpt: Optional[Path] = self.run.opening.checkpoint  # the one resumed from, if any
        last_samples: Optional[Path] = None
        bar = tqdm(total=t.steps, initial=self.step, disable=not main, desc="train",
                   dynamic_ncols=True, mininterval=1.0)
        stopping = faults.stop_cleanly(self.dist.rank, self.dist.enabled, lambda: self.step,
                                       self.run.last_good_checkpoint)
        # Closing the bar first makes an error message start on a line of its own.
        with stopping, contextlib.closing(bar):
            while self.step < t.steps and not stop_early:
                self.train_step()
                timed_steps += 1
                bar.update(1)
                # Under torchrun the ranks agree on the time limit at logging steps only: the
                # agreement is a collective whose result the host must read.
                at_log = self.step % t.log_every == 0 or self.step == t.steps
                if at_log or not self.dist.enabled:
                    stop_early = time_is_up(t.max_minutes, start_time)
                    if stop_early and main:
                        log.info("time limit of %.1f min reached at step %d", t.max_minutes,
                                 self.step)
                done = self.step == t.steps or stop_early
                sample_now = self.step % t.sample_every == 0 or done
                ckpt_now = self.step % t.ckpt_every == 0 or done
                if at_log or sample_now or ckpt_now or stop_early:
                    self.settle()
                if at_log or stop_early:
                    record = self._log_interval(interval_start, timed_steps, start_time)
                    if record["loss"] is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}",
                                        img_s=f"{record['images_per_sec']:.0f}")
                    interval_start, timed_steps = time.perf_counter(), 0
                if sample_now:
                    last_samples = self.sample_grid() or last_samples
                if ckpt_now:
                    last_ckpt = self.run.save(self.state) or last_ckpt
        if self.progress.skipped_steps and main:
            log.warning("%d step(s) of this run were skipped for a non-finite loss",
                        self.progress.skipped_steps)
        return TrainResult(self.run.path, self.step, last_ckpt, last_samples)

    def sample_grid(self) -> Optional[Path]:
        """The EMA model's sample grid at this step, written by rank 0. Under FSDP every rank
        computes it (the sharded EMA's forward is collective)."""
        path = None
        if self.dist.is_main or self.model.fsdp:
            conditions = grid_conditions(self.cfg, self.dataset, self.device,
                                         self.run.grid_classes)
            images, _ = generate(self.ema, self.objective, conditions,
                                 grid_settings(self.cfg, self.model.fsdp), progress=False)
            if self.decoder is not None:
                images = self.decoder(images)
            if self.dist.is_main:
                nrow = GRID_COLUMNS if self.cfg.model.num_classes >= GRID_COLUMNS else None
                path = self.run.save_samples(images, self.step, nrow)
        distributed.barrier()
        return path


def step_trainer(cfg: Config, dist: distributed.DistInfo, device: torch.device,
                 loader: BatchIterator, mesh=None, ddp: bool = True) -> Trainer:
    """What :meth:`Trainer.train_step` uses and nothing else: the model under the config's
    engine, the EMA, the optimizer and the objective, fed by ``loader`` (anything with the
    ``next()`` of a :class:`BatchIterator`); no run directory, dataset or decoder. ``diffmoe
    plan`` runs its steps on fake tensors (:mod:`diffmoe.plan`), where FSDP2 shards over a
    ``mesh`` made beforehand (default: every rank) and there is no DDP wrapper (``ddp``)."""
    trainer = Trainer.__new__(Trainer)  # without Trainer.__init__'s run directory and data
    trainer.cfg, trainer.device, trainer.dist, trainer.loader = cfg, device, dist, loader
    trainer._build_step_parts(mesh, ddp=ddp)
    return trainer


def train(cfg: Config, resume: bool = False, accept_changes: bool = False) -> TrainResult:
    """Train ``cfg`` to its end; under torchrun, also end this rank's part of the job (the exit
    barrier and the process group's teardown, :func:`diffmoe.distributed.teardown`)."""
    trainer, finished = None, False
    try:
        trainer = Trainer(cfg, resume, accept_changes)
        result = trainer.train()
        finished = True
        return result
    finally:
        step = trainer.step if trainer is not None else None
        if trainer is not None:
            trainer.close()
        distributed.teardown(wait_for_others=finished, step=step)


def train_from(config: Config | str | Path | dict, resume: bool = False,
               accept_changes: bool = False, **overrides: Any) -> TrainResult:
    """:func:`train` from a notebook: ``config`` a :class:`~diffmoe.config.Config`, a YAML path
    or a dict, updated with ``overrides`` as dotted keys or sections
    (:func:`~diffmoe.config.config_with`)::

        result = diffmoe.train("configs/digits_tiny.yaml", **{"train.out_dir": "runs/nb"})
        result = diffmoe.train(cfg, train={"steps": 100}, resume=True)
    """
    return train(config_with(config, overrides), resume, accept_changes)


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`train_from`: importing ``diffmoe.train`` binds the
    package's ``train`` attribute to the module, so ``diffmoe.train(...)`` calls the module."""

    def __call__(self, config: Config | str | Path | dict, resume: bool = False,
                 accept_changes: bool = False, **overrides: Any) -> TrainResult:
        return train_from(config, resume, accept_changes, **overrides)


sys.modules[__name__].__class__ = _CallableModule
