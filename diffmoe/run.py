"""A training run's directory: where a run starts or resumes, its checkpoints, its metrics and
its log.

Layout::

    <out_dir>/config.yaml       the resolved config
    <out_dir>/train.log         the log
    <out_dir>/metrics.jsonl     one JSON object per logging interval (``train.METRIC_FIELDS``)
    <out_dir>/samples/*.png     sample grids of the EMA model at intervals
    <out_dir>/checkpoints/      atomic checkpoints (see checkpoint.py)

An existing run is never overwritten: starting a run in a directory that already has checkpoints
or metrics is refused unless resume is asked for. Resume continues from the newest intact
checkpoint with everything in a :class:`TrainingState` restored (weights, EMA, optimizer, data
order, every rank's RNG state, the skipped-step count and the partly accumulated logging
interval), so that a killed and resumed run reproduces the uninterrupted one bit for bit. Metric
records written after that checkpoint (by the run that died) are dropped from ``metrics.jsonl``
and written again as the steps are replayed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from . import distributed, parallel
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
from .config import Config
from .data import BatchIterator
from .errors import CheckpointError, DiffMoEError
from .fileio import atomic_write_text
from .paths import file_in_the_way

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"


@dataclass
class Progress:
    """What the loop counts: optimizer steps done, steps skipped for a non-finite loss, and the
    logging interval in progress (per-metric sums over its kept steps on this rank, and how many
    steps were kept), the last two on the training device. ``unsettled``: (step, loss, kept) of
    the steps whose finiteness the host has not read yet (see ``Trainer.settle``)."""

    step: int
    skipped_steps: int
    interval_sums: torch.Tensor
    interval_good: torch.Tensor
    unsettled: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def start(cls, num_metrics: int, device: torch.device) -> "Progress":
        return cls(0, 0, torch.zeros(num_metrics, device=device, dtype=torch.float64),
                   torch.zeros((), device=device, dtype=torch.int64))

    def new_interval(self) -> None:
        self.interval_sums.zero_()
        self.interval_good.zero_()


@dataclass
class TrainingState:
    """Everything a checkpoint holds and resume restores."""

    model: parallel.TrainingModel
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    loader: BatchIterator
    progress: Progress


def model_config_diff(a: dict, b: dict, prefix: str = "model.") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += model_config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb and key != "preset":
            diffs.append(f"{prefix}{key} ({va!r} in the checkpoint, {vb!r} now)")
    return diffs


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class RunDirectory:
    """``train.out_dir`` of one run, as seen by rank ``dist.rank`` (rank 0 writes)."""

    def __init__(self, cfg: Config, dist: distributed.DistInfo, device: torch.device):
        self.cfg = cfg
        self.dist = dist
        self.device = device
        self.path = Path(cfg.train.out_dir)
        self.ckpt_root = self.path / "checkpoints"
        self.metrics_path = self.path / METRICS_FILE
        self.log_handler: Optional[logging.Handler] = None

    # -- start or resume --------------------------------------------------------------------

    def open(self, resume: bool) -> Optional[Path]:
        """Create the run (refusing a directory that holds one), or with ``resume`` find the
        checkpoint to continue from (None: the run had written none and starts again)."""
        blocker = file_in_the_way(self.path)
        if blocker is not None:
            raise DiffMoEError(f"train.out_dir '{self.path}' cannot be created: '{blocker}' is "
                               f"a file, not a directory; set train.out_dir to a directory")
        existing = list_checkpoints(self.ckpt_root)
        if not resume:
            if existing or self.metrics_path.exists():
                raise DiffMoEError(
                    f"run directory '{self.path}' already holds a run; add --resume to continue "
                    f"it or set train.out_dir to a new directory")
            if self.dist.is_main:
                self.path.mkdir(parents=True, exist_ok=True)
                (self.path / CONFIG_FILE).write_text(self.cfg.to_yaml())
                self._log_here()
            distributed.barrier()
            return None
        if self.dist.is_main:
            if self.path.is_dir():
                self._log_here()
            remove_incomplete(self.ckpt_root)
        if not existing:
            if (self.path / CONFIG_FILE).is_file():
                log.warning("--resume: '%s' has no checkpoint yet (the run stopped before its "
                            "first); starting it again from step 0", self.path)
                return None
            raise DiffMoEError(f"--resume: '{self.path}' has no checkpoint to resume from; "
                               f"start the run again with another train.out_dir")
        latest = find_latest_checkpoint(self.ckpt_root, check_hashes=True)
        if latest is None:
            raise CheckpointError(f"--resume: every checkpoint in '{self.ckpt_root}' is damaged; "
                                  f"start a new run in another train.out_dir")
        return latest

    def _log_here(self) -> None:
        """Copy the library's log to train.log until :meth:`close`."""
        self.log_handler = logging.FileHandler(self.path / LOG_FILE)
        self.log_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger("diffmoe").addHandler(self.log_handler)

    def close(self) -> None:
        """Stop writing to train.log (later runs in this process must not log into this one)."""
        if self.log_handler is not None:
            logging.getLogger("diffmoe").removeHandler(self.log_handler)
            self.log_handler.close()
            self.log_handler = None

    # -- checkpoints ------------------------------------------------------------------------

    def last_good_checkpoint(self) -> str:
        latest = find_latest_checkpoint(self.ckpt_root, check_hashes=False)
        return str(latest) if latest is not None else "none (no checkpoint written yet)"

    def save(self, s: TrainingState) -> Optional[Path]:
        """Checkpoint ``s`` at its step (collective: every rank takes part, rank 0 writes)."""
        rng_all = distributed.gather_objects(rng_state(self.device))
        sums_all = distributed.gather_objects(s.progress.interval_sums.tolist())
        module = s.model.module
        if s.model.fsdp:  # collectives: every rank takes part, rank 0 receives the full tensors
            weights = {"model": parallel.full_model_state(module),
                       "ema": parallel.full_model_state(s.ema)}
            opt_full = parallel.full_optimizer_state(module, s.optimizer)
        else:
            weights = {"model": module.state_dict(), "ema": s.ema.state_dict()}
            opt_full = s.optimizer.state_dict() if self.dist.is_main else {}
        path = None
        if self.dist.is_main:
            opt_tensors, opt_meta = optimizer_to_tensors(opt_full)
            rng = {f"rank{r}.{k}": v for r, st in enumerate(rng_all) for k, v in st.items()}
            state = {"config": self.cfg.to_dict(), "loader": s.loader.state_dict(),
                     "optimizer": opt_meta, "world_size": self.dist.world_size,
                     "skipped_steps": s.progress.skipped_steps,
                     "interval": {"sums": sums_all, "good": int(s.progress.interval_good)}}
            path = save_checkpoint(self.ckpt_root, s.progress.step,
                                   {**weights, "optimizer": opt_tensors, "rng": rng}, state)
            prune_checkpoints(self.ckpt_root, self.cfg.train.keep_checkpoints)
            log.info("saved checkpoint %s", path)
        distributed.barrier()
        return path

    def load(self, path: Path, s: TrainingState) -> None:
        """Restore ``s`` from the checkpoint ``path`` (chosen by :meth:`open`, every hash
        checked) after checking it was trained with this architecture."""
        ckpt = LoadedCheckpoint(path, verify_checkpoint(path, check_hashes=False), verified=True)
        state = ckpt.state
        diffs = model_config_diff(state["config"]["model"], self.cfg.to_dict()["model"])
        if diffs:
            raise CheckpointError(f"checkpoint '{path}' was trained with a different architecture: "
                                  f"{'; '.join(diffs[:3])}; resume with the run's config.yaml")
        fsdp, module = s.model.fsdp, s.model.module
        for name, target in (("model", module), ("ema", s.ema)):
            load_state_dict_checked(target, ckpt.tensors(name), f"'{path}' ({name})",
                                    parallel.load_full_model_state(target) if fsdp else None)
        opt_state = optimizer_from_tensors(ckpt.tensors("optimizer"), state["optimizer"])
        if fsdp:
            parallel.load_full_optimizer_state(module, s.optimizer, opt_state)
        else:
            s.optimizer.load_state_dict(opt_state)
        self._load_progress(ckpt, s)
        log.info("resumed from %s at step %d", path, s.progress.step)

    def _load_progress(self, ckpt: LoadedCheckpoint, s: TrainingState) -> None:
        """Data position, counters, and (when the run had as many ranks) this rank's RNG
        streams and its part of the logging interval."""
        state, rank = ckpt.state, self.dist.rank
        world = state.get("world_size", 1)
        same_world = world == self.dist.world_size
        if same_world:
            set_rng_state({k.split(".", 1)[1]: v for k, v in ckpt.tensors("rng").items()
                           if k.startswith(f"rank{rank}.")}, self.device)
        else:
            log.warning("checkpoint was written by %d ranks, resuming on %d: RNG streams restart",
                        world, self.dist.world_size)
        s.loader.load_state_dict(state["loader"])
        p = s.progress
        p.step = int(state["step"])
        p.skipped_steps = int(state.get("skipped_steps", 0))
        interval = state.get("interval")
        if interval and same_world:
            p.interval_sums = torch.tensor(interval["sums"][rank], device=self.device,
                                           dtype=torch.float64)
            p.interval_good = torch.tensor(int(interval["good"]), device=self.device)

    # -- metrics ----------------------------------------------------------------------------

    def write_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def rewind_metrics(self, step: int) -> None:
        """Drop metric records past ``step`` (and any line cut short by a crash): the resumed
        run replays those steps and writes them again."""
        if not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                if int(json.loads(line)["step"]) <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        if len(keep) == len(lines):
            return
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in keep), durable=True)
        log.info("metrics.jsonl: dropped %d record(s) written after step %d by the interrupted "
                 "run; those steps are replayed", len(lines) - len(keep), step)
