"""Training loop: single process on CPU/GPU, or data-parallel under ``torchrun`` (DDP).

A run directory holds everything a run writes::

    <out_dir>/config.yaml       the resolved config
    <out_dir>/train.log         the log
    <out_dir>/metrics.jsonl     one JSON object per logging interval (see ``METRIC_FIELDS``)
    <out_dir>/samples/*.png     sample grids of the EMA model at intervals
    <out_dir>/checkpoints/      atomic checkpoints (see checkpoint.py)

An existing run is never overwritten: starting a run in a directory that already has checkpoints
is refused unless ``resume`` is asked for, and resume continues from the newest intact checkpoint
with the data order, RNG states, optimizer, EMA and thresholds restored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed
from .capacity import expert_capacities
from .checkpoint import (
    LoadedCheckpoint,
    find_latest_checkpoint,
    list_checkpoints,
    load_state_dict_checked,
    optimizer_from_tensors,
    optimizer_to_tensors,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from .config import Config, TrainConfig
from .data import BatchIterator, ImageDataset, build_dataset
from .diffusion import FlowMatching
from .ema import ema_decay, make_ema, update_ema
from .errors import CheckpointError, ConfigError, DiffMoEError
from .images import save_grid
from .models import DiT, DiTOutput, build_model
from .models.moe import average_thresholds_across_ranks, diffmoe_layers
from .models.moe.diffmoe import dynamic_counts
from .sample import generate, resolve_routing

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
GRID_COLUMNS = 10  # sample grids cycle labels 0..9, one class per column

METRIC_FIELDS = {
    "step": "optimizer steps done",
    "loss": "total loss backpropagated (diffusion + aux + predictor)",
    "diffusion_loss": "flow-matching MSE",
    "aux_loss": "alpha-weighted token-choice balance loss (0 otherwise)",
    "predictor_bce": "weighted capacity-predictor BCE, mean over MoE layers (Eq. 12)",
    "threshold_mean": "mean DiffMoE threshold tau over layers and experts (Eq. 17)",
    "dynamic_capacity": "C (Eq. 9) dynamic inference would use on the training batch",
    "images_per_sec": "training throughput over the interval (all ranks)",
    "lr": "learning rate",
    "elapsed_s": "seconds since this process started training",
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use "
                          "train.device=cpu or auto")
    return torch.device(name)


def check_data_matches_model(cfg: Config, ds: ImageDataset) -> None:
    m = cfg.model
    if ds.image_size != m.input_size or ds.channels != m.in_channels:
        raise ConfigError(
            f"dataset '{ds.name}' has {ds.channels}x{ds.image_size}x{ds.image_size} images but the "
            f"model expects {m.in_channels}x{m.input_size}x{m.input_size}; set "
            f"model.input_size={ds.image_size} model.in_channels={ds.channels}")
    if ds.num_classes > m.num_classes:
        raise ConfigError(f"dataset '{ds.name}' has {ds.num_classes} classes but "
                          f"model.num_classes={m.num_classes}; set "
                          f"model.num_classes={ds.num_classes}")


def model_config_diff(a: dict, b: dict, prefix: str = "model.") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += model_config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb and key != "preset":
            diffs.append(f"{prefix}{key} ({va!r} in the checkpoint, {vb!r} now)")
    return diffs


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the config's hyper-parameters, using the fused kernel where torch has one for
    the parameters' device (CPU and CUDA): on a CPU it is about 9x faster than the default
    multi-tensor kernel, which matters for MoE models with many expert parameters."""
    kwargs = dict(lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(model.parameters(), **kwargs)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_checkpoint: Optional[Path]
    last_samples: Optional[Path]


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg = cfg
        t = cfg.train
        self.device = resolve_device(t.device)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.dist = distributed.setup(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if t.batch_size % self.dist.world_size:
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the "
                              f"{self.dist.world_size} ranks; pick a multiple of the world size")
        self.run_dir = Path(t.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.resume_from = self._prepare_run_dir(resume)

        self.dataset = build_dataset(cfg.data.name, cfg.data.split, cfg.data.limit)
        check_data_matches_model(cfg, self.dataset)
        self.loader = BatchIterator(self.dataset, t.batch_size // self.dist.world_size, t.seed,
                                    self.dist.rank, self.dist.world_size, self.device)

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model: DiT = build_model(cfg.model).to(self.device)
        self.ema = make_ema(self.model)
        self.optimizer = build_optimizer(self.model, t)
        self.flow = FlowMatching(cfg.model.in_channels, cfg.objective.time_scale)
        self.step = 0
        torch.manual_seed(t.seed + 1 + self.dist.rank)  # per-rank noise, timesteps, label dropout
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.net = self.model
        if self.dist.enabled:
            # Buffers (the thresholds) are averaged explicitly after each step, not broadcast.
            self.net = DistributedDataParallel(
                self.model, broadcast_buffers=False,
                device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if t.compile:
            self.net = torch.compile(self.net)
        self.diffmoe_layers = diffmoe_layers(self.model)

    # -- run directory ----------------------------------------------------------------------

    def _prepare_run_dir(self, resume: bool) -> Optional[Path]:
        existing = list_checkpoints(self.ckpt_root)
        if not resume:
            if existing or (self.run_dir / "metrics.jsonl").exists():
                raise DiffMoEError(
                    f"run directory '{self.run_dir}' already holds a run; add --resume to continue "
                    f"it or set train.out_dir to a new directory")
            if self.dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
            distributed.barrier()
            return None
        if not existing:
            raise DiffMoEError(f"--resume: '{self.run_dir}' has no checkpoint to resume from; "
                               f"start the run again with another train.out_dir")
        latest = find_latest_checkpoint(self.ckpt_root, check_hashes=True)
        if latest is None:
            raise CheckpointError(f"--resume: every checkpoint in '{self.ckpt_root}' is damaged; "
                                  f"start a new run in another train.out_dir")
        return latest

    def _load(self, path: Path) -> None:
        ckpt = LoadedCheckpoint(path, verify_checkpoint(path, check_hashes=False))
        state = ckpt.state
        diffs = model_config_diff(state["config"]["model"], self.cfg.to_dict()["model"])
        if diffs:
            raise CheckpointError(f"checkpoint '{path}' was trained with a different architecture: "
                                  f"{'; '.join(diffs[:3])}; resume with the run's config.yaml")
        load_state_dict_checked(self.model, ckpt.tensors("model"), f"'{path}' (model)")
        load_state_dict_checked(self.ema, ckpt.tensors("ema"), f"'{path}' (ema)")
        self.optimizer.load_state_dict(optimizer_from_tensors(ckpt.tensors("optimizer"),
                                                              state["optimizer"]))
        rng = ckpt.tensors("rng")
        world = state.get("world_size", 1)
        if world == self.dist.world_size:
            _set_rng_state({k.split(".", 1)[1]: v for k, v in rng.items()
                            if k.startswith(f"rank{self.dist.rank}.")}, self.device)
        else:
            log.warning("checkpoint was written by %d ranks, resuming on %d: RNG streams restart",
                        world, self.dist.world_size)
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Optional[Path]:
        rng_all = distributed.gather_objects(_rng_state(self.device))
        path = None
        if self.dist.is_main:
            opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer.state_dict())
            rng = {f"rank{r}.{k}": v for r, st in enumerate(rng_all) for k, v in st.items()}
            state = {"config": self.cfg.to_dict(), "loader": self.loader.state_dict(),
                     "optimizer": opt_meta, "world_size": self.dist.world_size}
            path = save_checkpoint(self.ckpt_root, self.step,
                                   {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                                    "optimizer": opt_tensors, "rng": rng}, state)
            prune_checkpoints(self.ckpt_root, self.cfg.train.keep_checkpoints)
            log.info("saved checkpoint %s", path)
        distributed.barrier()
        return path

    # -- training ---------------------------------------------------------------------------

    def _autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _lr(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant or cosine decay to 0."""
        t = self.cfg.train
        if t.warmup_steps and step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
            return t.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return t.lr

    @torch.no_grad()
    def _capacity_stats(self, out: DiTOutput) -> torch.Tensor:
        """(mean threshold, C of Eq. 9 that dynamic inference would spend on this batch) for
        DiffMoE; zeros for the other layers."""
        if not self.diffmoe_layers:
            return torch.zeros(2, device=self.device)
        taus, caps = [], []
        for o, m in zip([o for o in out.layers if o.predictor_logits_SE is not None],
                        self.diffmoe_layers):
            taus.append(m.thresholds_E.mean())
            counts_E = dynamic_counts(o.predictor_logits_SE, m.thresholds_E)
            caps.append(expert_capacities(counts_E, o.num_tokens, o.base_experts).mean())
        return torch.stack([torch.stack(taus).mean(), torch.stack(caps).mean()])

    def sample_grid(self) -> Path:
        s = self.cfg.sample
        classes = self.cfg.model.num_classes
        labels = torch.arange(s.num, device=self.device) % min(classes, GRID_COLUMNS)
        routing = resolve_routing(self.ema, s.mode, s.threshold)
        images, _ = generate(self.ema, self.flow, labels, sampler=s.sampler, steps=s.steps,
                             cfg_scale=s.cfg_scale, routing=routing, batch_size=s.batch_size,
                             seed=s.seed, progress=False)
        nrow = GRID_COLUMNS if classes >= GRID_COLUMNS else None
        return save_grid(images, self.run_dir / "samples" / f"step_{self.step:08d}.png", nrow=nrow,
                         upscale=2)

    def _write_metrics(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def train(self) -> TrainResult:
        t = self.cfg.train
        main = self.dist.is_main
        if main:
            handler = logging.FileHandler(self.run_dir / "train.log")
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            logging.getLogger("diffmoe").addHandler(handler)
            log.info("run %s: %s, %.2fM parameters, %d ranks, device %s", self.run_dir,
                     self.cfg.model.moe.type, self.model.num_params() / 1e6,
                     self.dist.world_size, self.device)
        self.net.train()
        sums = torch.zeros(6, device=self.device, dtype=torch.float64)
        count, interval_start = 0, time.perf_counter()
        start_time = time.perf_counter()
        last_ckpt: Optional[Path] = None
        last_samples: Optional[Path] = None
        bar = tqdm(total=t.steps, initial=self.step, disable=not main, desc="train",
                   dynamic_ncols=True, mininterval=1.0)
        stop_early = False
        while self.step < t.steps and not stop_early:
            x, y = self.loader.next()
            lr = self._lr(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with self._autocast():
                out = self.flow.loss(self.net, x, y)
            if not torch.isfinite(out.loss):
                latest = list_checkpoints(self.ckpt_root)
                raise DiffMoEError(
                    f"non-finite loss at step {self.step + 1}; last checkpoint: "
                    f"{latest[-1] if latest else 'none'}; lower train.lr or set train.grad_clip")
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.optimizer.step()
            average_thresholds_across_ranks(self.diffmoe_layers)
            update_ema(self.ema, self.model, ema_decay(t.ema_decay, self.step, t.ema_warmup),
                       t.ema_buffers)
            self.step += 1
            bar.update(1)

            stats = self._capacity_stats(out.model_output)
            sums += torch.stack([out.loss.detach(), out.diffusion_loss, out.aux_loss,
                                 out.predictor_loss, stats[0], stats[1]]).double()
            count += 1
            if t.max_minutes:
                over = torch.tensor(float(time.perf_counter() - start_time > 60 * t.max_minutes))
                stop_early = bool(distributed.all_mean(over) > 0)
                if stop_early and main:
                    log.info("time limit of %.1f min reached at step %d", t.max_minutes, self.step)
            if self.step % t.log_every == 0 or self.step == t.steps or stop_early:
                means = distributed.all_mean(sums / count).tolist()
                dt = time.perf_counter() - interval_start
                record = dict(zip(["loss", "diffusion_loss", "aux_loss", "predictor_bce",
                                   "threshold_mean", "dynamic_capacity"], means))
                record = {"step": self.step, **record,
                          "images_per_sec": count * t.batch_size / dt, "lr": lr,
                          "elapsed_s": time.perf_counter() - start_time}
                if main:
                    self._write_metrics(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}",
                                    img_s=f"{record['images_per_sec']:.0f}")
                    log.debug("metrics %s", record)
                sums.zero_()
                count, interval_start = 0, time.perf_counter()
            done = self.step == t.steps or stop_early
            if self.step % t.sample_every == 0 or done:
                if main:
                    last_samples = self.sample_grid()
                    log.info("wrote samples %s", last_samples)
                distributed.barrier()
            if self.step % t.ckpt_every == 0 or done:
                last_ckpt = self.save() or last_ckpt
        bar.close()
        return TrainResult(self.run_dir, self.step, last_ckpt, last_samples)


def train(cfg: Config, resume: bool = False) -> TrainResult:
    trainer = Trainer(cfg, resume)
    try:
        return trainer.train()
    finally:
        distributed.teardown()

