"""Training loop: single process on CPU/GPU, or data-parallel under ``torchrun`` (DDP, or FSDP2
with ``train.parallel=fsdp``), with gradient accumulation (``train.grad_accum``), activation
checkpointing and bf16 autocast from the config.

A run directory holds everything a run writes::

    <out_dir>/config.yaml       the resolved config
    <out_dir>/train.log         the log
    <out_dir>/metrics.jsonl     one JSON object per logging interval (see ``METRIC_FIELDS``)
    <out_dir>/samples/*.png     sample grids of the EMA model at intervals
    <out_dir>/checkpoints/      atomic checkpoints (see checkpoint.py)

An existing run is never overwritten: starting a run in a directory that already has checkpoints
is refused unless ``resume`` is asked for, and resume continues from the newest intact checkpoint
with the data order, RNG states, optimizer, EMA, thresholds and the partly accumulated logging
interval restored, so that a killed and resumed run reproduces the uninterrupted one bit for bit.
Metric records written after that checkpoint (by the run that died) are dropped from
``metrics.jsonl`` and written again as the steps are replayed.

Faults stop a run with a :class:`TrainingError` that names the step and the checkpoint to resume
from: a non-finite loss (unless ``train.nonfinite_loss=skip``), a rank that died or stopped
answering for ``train.dist_timeout_s`` under torchrun, and SIGTERM (which torchrun sends to the
surviving ranks when one fails).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed, scale
from .capacity import expert_capacities
from .checkpoint import (
    LoadedCheckpoint,
    find_latest_checkpoint,
    list_checkpoints,
    load_state_dict_checked,
    optimizer_from_tensors,
    optimizer_to_tensors,
    prune_checkpoints,
    remove_incomplete,
    save_checkpoint,
    verify_checkpoint,
)
from .config import Config, TrainConfig
from .data import BatchIterator, ImageDataset, build_training_dataset, sample_decoder
from .diffusion import build_objective
from .ema import ema_decay, make_ema, update_ema
from .errors import CheckpointError, ConfigError, DiffMoEError, TrainingError
from .fileio import atomic_write_text
from .images import save_grid
from .loss import training_loss
from .models import DiT, DiTOutput, build_model
from .models.moe import apply_threshold_updates, diffmoe_layers
from .models.moe.diffmoe import dynamic_counts
from .paths import file_in_the_way
from .sample import generate

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
GRID_COLUMNS = 10  # sample grids cycle labels 0..9, one class per column

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
GLOO_LOCATION_RE = re.compile(r"^\[[^\]]*\]\s*")  # "[.../pair.cc:537] " before gloo messages


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
    if m.condition == "class" and ds.num_classes > m.num_classes:
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
        self.dist = distributed.setup(self.device.type, t.dist_timeout_s)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if t.batch_size % (self.dist.world_size * t.grad_accum):
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the "
                              f"{self.dist.world_size} ranks x train.grad_accum={t.grad_accum}; "
                              f"pick a multiple of their product")
        self.fsdp = self.dist.enabled and t.parallel == "fsdp"
        self.run_dir = Path(t.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.log_handler: Optional[logging.Handler] = None
        self.net: Optional[torch.nn.Module] = None
        self.ddp: Optional[DistributedDataParallel] = None
        try:
            self._build(resume)
        except BaseException:
            self.close()
            raise

    def _build(self, resume: bool) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.resume_from = self._prepare_run_dir(resume)

        self.dataset = build_training_dataset(cfg)
        check_data_matches_model(cfg, self.dataset)
        self.loader = BatchIterator(self.dataset, t.batch_size // self.dist.world_size, t.seed,
                                    self.dist.rank, self.dist.world_size, self.device)

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model: DiT = build_model(cfg.model, t.token_pool).to(self.device)
        self.model.activation_checkpointing = t.activation_checkpointing
        self.ema = make_ema(self.model)
        if self.fsdp:
            scale.shard(self.model)
            scale.shard(self.ema)
        self.optimizer = build_optimizer(self.model, t)
        self.objective = build_objective(cfg)
        self.step = 0
        self.skipped_steps = 0
        # The logging interval in progress: per-metric sums over its good (finite-loss) steps
        # and how many there were. Checkpointed, so that resume can finish the interval.
        self.interval_sums = torch.zeros(len(MEAN_FIELDS), device=self.device,
                                         dtype=torch.float64)
        self.interval_good = 0
        torch.manual_seed(t.seed + 1 + self.dist.rank)  # per-rank noise, timesteps, label dropout
        if self.resume_from is not None:
            self._load(self.resume_from)
        if resume and self.dist.is_main:
            self._rewind_metrics()
        self.net = self.model
        self.ddp: Optional[DistributedDataParallel] = None
        if self.dist.enabled and not self.fsdp:
            # Buffers (the thresholds) are averaged explicitly after each step, not broadcast.
            self.net = self.ddp = DistributedDataParallel(
                self.model, broadcast_buffers=False,
                device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if t.compile:
            self.net = torch.compile(self.net)
        self.diffmoe_layers = diffmoe_layers(self.model)
        # Latent models' sample grids are decoded with the VAE (by the ranks that sample).
        self.decoder = (sample_decoder(cfg.to_dict()["data"], self.device)
                        if self.dist.is_main or self.fsdp else None)

    # -- run directory ----------------------------------------------------------------------

    def _prepare_run_dir(self, resume: bool) -> Optional[Path]:
        blocker = file_in_the_way(self.run_dir)
        if blocker is not None:
            raise DiffMoEError(f"train.out_dir '{self.run_dir}' cannot be created: '{blocker}' is "
                               f"a file, not a directory; set train.out_dir to a directory")
        existing = list_checkpoints(self.ckpt_root)
        if not resume:
            if existing or (self.run_dir / "metrics.jsonl").exists():
                raise DiffMoEError(
                    f"run directory '{self.run_dir}' already holds a run; add --resume to continue "
                    f"it or set train.out_dir to a new directory")
            if self.dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
                self._log_to_run_dir()
            distributed.barrier()
            return None
        if self.dist.is_main:
            if self.run_dir.is_dir():
                self._log_to_run_dir()
            remove_incomplete(self.ckpt_root)
        if not existing:
            if (self.run_dir / "config.yaml").is_file():
                log.warning("--resume: '%s' has no checkpoint yet (the run stopped before its "
                            "first); starting it again from step 0", self.run_dir)
                return None
            raise DiffMoEError(f"--resume: '{self.run_dir}' has no checkpoint to resume from; "
                               f"start the run again with another train.out_dir")
        latest = find_latest_checkpoint(self.ckpt_root, check_hashes=True)
        if latest is None:
            raise CheckpointError(f"--resume: every checkpoint in '{self.ckpt_root}' is damaged; "
                                  f"start a new run in another train.out_dir")
        return latest

    def _log_to_run_dir(self) -> None:
        """Copy the library's log to <out_dir>/train.log until :meth:`close`."""
        self.log_handler = logging.FileHandler(self.run_dir / "train.log")
        self.log_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger("diffmoe").addHandler(self.log_handler)

    def close(self) -> None:
        """Free the DDP / compiled wrappers and stop writing to train.log (later runs in this
        process must not log into this one).

        The DDP wrapper's ``Reducer`` holds the process group from C++; it must be freed before
        the group is destroyed, so that the group's last reference is a Python one, which
        releases the GIL as gloo joins its threads (see :mod:`diffmoe.distributed`)."""
        self.net = self.ddp = None
        if self.log_handler is not None:
            logging.getLogger("diffmoe").removeHandler(self.log_handler)
            self.log_handler.close()
            self.log_handler = None

    def _load(self, path: Path) -> None:
        # Every hash was checked when the checkpoint was chosen (find_latest_checkpoint).
        ckpt = LoadedCheckpoint(path, verify_checkpoint(path, check_hashes=False), verified=True)
        state = ckpt.state
        diffs = model_config_diff(state["config"]["model"], self.cfg.to_dict()["model"])
        if diffs:
            raise CheckpointError(f"checkpoint '{path}' was trained with a different architecture: "
                                  f"{'; '.join(diffs[:3])}; resume with the run's config.yaml")
        for name, module in (("model", self.model), ("ema", self.ema)):
            load_state_dict_checked(module, ckpt.tensors(name), f"'{path}' ({name})",
                                    scale.load_full_model_state(module) if self.fsdp else None)
        opt_state = optimizer_from_tensors(ckpt.tensors("optimizer"), state["optimizer"])
        if self.fsdp:
            scale.load_full_optimizer_state(self.model, self.optimizer, opt_state)
        else:
            self.optimizer.load_state_dict(opt_state)
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
        self.skipped_steps = int(state.get("skipped_steps", 0))
        interval = state.get("interval")
        if interval and world == self.dist.world_size:
            self.interval_sums = torch.tensor(interval["sums"][self.dist.rank],
                                              device=self.device, dtype=torch.float64)
            self.interval_good = int(interval["good"])
        log.info("resumed from %s at step %d", path, self.step)

    def _rewind_metrics(self) -> None:
        """Drop metric records past the resumed step (and any line cut short by a crash): the
        resumed run replays those steps and writes them again."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                if int(json.loads(line)["step"]) <= self.step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        if len(keep) == len(lines):
            return
        atomic_write_text(path, "".join(line + "\n" for line in keep), durable=True)
        log.info("metrics.jsonl: dropped %d record(s) written after step %d by the interrupted "
                 "run; those steps are replayed", len(lines) - len(keep), self.step)

    def save(self) -> Optional[Path]:
        rng_all = distributed.gather_objects(_rng_state(self.device))
        sums_all = distributed.gather_objects(self.interval_sums.tolist())
        if self.fsdp:  # collectives: every rank takes part, rank 0 receives the full tensors
            weights = {"model": scale.full_model_state(self.model),
                       "ema": scale.full_model_state(self.ema)}
            opt_full = scale.full_optimizer_state(self.model, self.optimizer)
        else:
            weights = {"model": self.model.state_dict(), "ema": self.ema.state_dict()}
            opt_full = self.optimizer.state_dict() if self.dist.is_main else {}
        path = None
        if self.dist.is_main:
            opt_tensors, opt_meta = optimizer_to_tensors(opt_full)
            rng = {f"rank{r}.{k}": v for r, st in enumerate(rng_all) for k, v in st.items()}
            state = {"config": self.cfg.to_dict(), "loader": self.loader.state_dict(),
                     "optimizer": opt_meta, "world_size": self.dist.world_size,
                     "skipped_steps": self.skipped_steps,
                     "interval": {"sums": sums_all, "good": self.interval_good}}
            path = save_checkpoint(self.ckpt_root, self.step,
                                   {**weights, "optimizer": opt_tensors, "rng": rng}, state)
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
        layers = [o for o in out.layers if o.thresholds_E is not None]  # DiffMoE layers
        if not layers:
            return torch.zeros(2, device=self.device)
        taus = torch.stack([o.thresholds_E.mean() for o in layers])
        caps = torch.stack([
            expert_capacities(dynamic_counts(o.predictor_logits_SE, o.thresholds_E),
                              o.num_tokens, o.base_experts).mean() for o in layers])
        return torch.stack([taus.mean(), caps.mean()])

    def sample_grid(self) -> Optional[Path]:
        """The EMA model's sample grid, written by rank 0. Under FSDP every rank takes part (the
        sharded EMA's forward is collective) and all compute the same images."""
        s = self.cfg.sample
        classes = self.cfg.model.num_classes
        labels = torch.arange(s.num, device=self.device) % min(classes, GRID_COLUMNS)
        if self.cfg.model.condition == "text":  # the captions of the first images
            labels = self.dataset.conditions(torch.arange(s.num) % len(self.dataset))
        images, _ = generate(self.ema, self.objective, labels, s, progress=False)
        if self.decoder is not None:
            images = self.decoder(images)
        if not self.dist.is_main:
            return None
        nrow = GRID_COLUMNS if classes >= GRID_COLUMNS else None
        return save_grid(images, self.run_dir / "samples" / f"step_{self.step:08d}.png", nrow=nrow,
                         upscale=2)

    def _write_metrics(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _last_good_checkpoint(self) -> str:
        latest = find_latest_checkpoint(self.ckpt_root, check_hashes=False)
        return str(latest) if latest is not None else "none (no checkpoint written yet)"

    def _nonfinite_loss(self, loss: torch.Tensor) -> None:
        """A NaN/Inf loss on some rank at step ``self.step + 1``: stop with an error, or (with
        ``train.nonfinite_loss=skip``) count a skip; the caller then leaves weights, EMA,
        optimizer and thresholds untouched."""
        t = self.cfg.train
        step = self.step + 1
        value = loss.item()
        what = f"{value}" if not math.isfinite(value) else "on another rank"
        if t.nonfinite_loss == "stop":
            raise TrainingError(
                f"non-finite loss ({what}) at step {step}; last good checkpoint: "
                f"{self._last_good_checkpoint()}; resume from it with --resume after lowering "
                f"train.lr or setting train.grad_clip, or set train.nonfinite_loss=skip")
        self.skipped_steps += 1
        if t.max_skipped_steps and self.skipped_steps > t.max_skipped_steps:
            raise TrainingError(
                f"non-finite loss ({what}) at step {step}: more than train.max_skipped_steps="
                f"{t.max_skipped_steps} steps skipped; last good checkpoint: "
                f"{self._last_good_checkpoint()}; check the data, lower train.lr or set "
                f"train.grad_clip, then resume with --resume")
        log.warning("non-finite loss (%s) at step %d: step skipped (%d skipped so far)", what,
                    step, self.skipped_steps)

    @contextlib.contextmanager
    def _stop_cleanly(self):
        """Turn what ends a run from outside into a :class:`TrainingError` naming the step and
        the checkpoint to resume from: SIGTERM (a scheduler, or torchrun stopping the surviving
        ranks after one failed), and a collective that failed because another rank died or
        stopped answering within ``train.dist_timeout_s``."""
        def on_sigterm(signum, frame):
            raise TrainingError(
                f"stopped by {signal.Signals(signum).name} at step {self.step} (the job was "
                f"cancelled, or another rank failed); last good checkpoint: "
                f"{self._last_good_checkpoint()}; resume with --resume")

        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
        try:
            yield
        except RuntimeError as exc:
            if not (self.dist.enabled and distributed.is_collective_failure(exc)):
                raise
            reason = GLOO_LOCATION_RE.sub("", str(exc).strip().splitlines()[0]).split(". ")[0]
            raise TrainingError(
                f"rank {self.dist.rank}: lost contact with another rank at step {self.step + 1} "
                f"({reason}); another rank died or hung (see its log), so the run stopped; last "
                f"good checkpoint: {self._last_good_checkpoint()}; resume with --resume") from exc
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)

    def _train_step(self) -> None:
        """One optimizer step (or one skipped for a non-finite loss); adds its metrics to the
        logging interval."""
        t = self.cfg.train
        x, y = self.loader.next()
        lr = self._lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Each micro-batch is its own DiffMoE token pool (and threshold update, Eq. 17, applied
        # once the step is known to be kept); gradients of loss / grad_accum accumulate, and are
        # reduced across ranks on the last one only. The ranks agree that a micro-batch's loss is
        # finite (one collective) before its backward, so a non-finite loss on any rank skips the
        # step everywhere without a backward or a gradient all-reduce, and leaves τ as it was.
        self.optimizer.zero_grad(set_to_none=True)
        metrics, targets = [], []
        good = True
        micro = list(zip(x.chunk(t.grad_accum), y.chunk(t.grad_accum)))
        for i, (x_m, y_m) in enumerate(micro):
            with scale.gradient_sync(self.ddp, self.model if self.fsdp else None,
                                     i == len(micro) - 1):
                with self._autocast():
                    out = training_loss(self.objective.loss(self.net, x_m, y_m),
                                        self.cfg.model.moe)
                stats = self._capacity_stats(out.model_output)
                metrics.append(torch.stack([out.loss.detach(), out.diffusion_loss, out.aux_loss,
                                            out.predictor_loss, stats[0], stats[1]]).double())
                if distributed.any_rank(~torch.isfinite(out.loss.detach())):
                    good = False
                    break
                targets.append([o.threshold_targets_E for o in out.model_output.layers
                                if o.threshold_targets_E is not None])
                (out.loss / len(micro)).backward()
        step_metrics = torch.stack(metrics).mean(0)
        if good:
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.optimizer.step()
            for micro_targets in targets:
                apply_threshold_updates(self.diffmoe_layers, micro_targets)
            update_ema(self.ema, self.model, ema_decay(t.ema_decay, self.step, t.ema_warmup),
                       t.ema_buffers)
            self.interval_sums += step_metrics
            self.interval_good += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite_loss(step_metrics[0])
        self.step += 1

    def _log_interval(self, interval_start: float, timed_steps: int, start_time: float) -> dict:
        """Write the interval's record (``timed_steps`` steps since ``interval_start`` in this
        process, for the throughput) and start the next interval."""
        t = self.cfg.train
        means = distributed.all_mean(self.interval_sums / max(1, self.interval_good)).tolist()
        if not self.interval_good:
            means = [None] * len(means)
        dt = time.perf_counter() - interval_start
        record = {"step": self.step, **dict(zip(MEAN_FIELDS, means)),
                  "images_per_sec": timed_steps * t.batch_size / dt,
                  "lr": self._lr(self.step - 1), "elapsed_s": time.perf_counter() - start_time,
                  "skipped_steps": self.skipped_steps}
        if self.dist.is_main:
            self._write_metrics(record)
            log.debug("metrics %s", record)
        self.interval_sums.zero_()
        self.interval_good = 0
        return record

    def train(self) -> TrainResult:
        t = self.cfg.train
        main = self.dist.is_main
        if main:
            log.info("run %s: %s, %.2fM parameters, %d ranks, device %s", self.run_dir,
                     self.cfg.model.moe.type, self.model.num_params() / 1e6,
                     self.dist.world_size, self.device)
        self.net.train()
        interval_start = start_time = time.perf_counter()
        timed_steps = 0
        last_ckpt: Optional[Path] = None
        last_samples: Optional[Path] = None
        bar = tqdm(total=t.steps, initial=self.step, disable=not main, desc="train",
                   dynamic_ncols=True, mininterval=1.0)
        stop_early = False
        # Closing the bar first makes an error message start on a line of its own.
        with self._stop_cleanly(), contextlib.closing(bar):
            while self.step < t.steps and not stop_early:
                self._train_step()
                timed_steps += 1
                bar.update(1)
                if t.max_minutes:
                    over = time.perf_counter() - start_time > 60 * t.max_minutes
                    stop_early = bool(distributed.all_mean(torch.tensor(float(over))) > 0)
                    if stop_early and main:
                        log.info("time limit of %.1f min reached at step %d", t.max_minutes,
                                 self.step)
                if self.step % t.log_every == 0 or self.step == t.steps or stop_early:
                    record = self._log_interval(interval_start, timed_steps, start_time)
                    if record["loss"] is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}",
                                        img_s=f"{record['images_per_sec']:.0f}")
                    interval_start, timed_steps = time.perf_counter(), 0
                done = self.step == t.steps or stop_early
                if self.step % t.sample_every == 0 or done:
                    if main or self.fsdp:
                        last_samples = self.sample_grid() or last_samples
                        if main:
                            log.info("wrote samples %s", last_samples)
                    distributed.barrier()
                if self.step % t.ckpt_every == 0 or done:
                    last_ckpt = self.save() or last_ckpt
        if self.skipped_steps and main:
            log.warning("%d step(s) of this run were skipped for a non-finite loss",
                        self.skipped_steps)
        return TrainResult(self.run_dir, self.step, last_ckpt, last_samples)


def train(cfg: Config, resume: bool = False) -> TrainResult:
    """Train ``cfg`` to its end; under torchrun, also end this rank's part of the job (the exit
    barrier and the process group's teardown, :func:`diffmoe.distributed.teardown`)."""
    trainer, finished = None, False
    try:
        trainer = Trainer(cfg, resume)
        result = trainer.train()
        finished = True
        return result
    finally:
        step = trainer.step if trainer is not None else None
        if trainer is not None:
            trainer.close()
        distributed.teardown(wait_for_others=finished, step=step)

