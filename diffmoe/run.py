"""A training run's directory: where a run starts or resumes, what it writes there, the lock on
it, its checkpoints, its metrics and its log.

Layout (every name a run writes into ``train.out_dir``)::

    config.yaml              the config the run trains under now
    config_history/          step_XXXXXXXX.yaml: each config the run was trained under, from the
                             step it took effect (begun when a resume changes the config)
    train.log                the log, only ever appended to
    metrics.jsonl            one JSON object per logging interval (``train.METRIC_FIELDS``)
    metrics.set-aside.txt    lines of metrics.jsonl that were no metric record, kept by resume
    samples/*.png            sample grids of the EMA model at intervals
    samples/grid_classes.json  the class of each grid column (class-conditional models)
    tensorboard/, wandb/     the dashboards of ``train.trackers`` (:mod:`diffmoe.trackers`)
    checkpoints/             atomic checkpoints (see checkpoint.py)
    train.lock               held by the training writing here: its pid, host and start time
    previous-<time>/         what a run restarted from step 0 found of its earlier attempt

:meth:`RunDirectory.open` makes every check before any work and writes nothing but the lock; the
trainer then builds everything, and :meth:`RunDirectory.begin` writes. Nothing a run did not
write is replaced: a new run refuses a directory in which one of these names holds something
(``train.log`` aside, which is appended to).

Resume continues from the newest intact checkpoint with everything in a :class:`TrainingState`
restored (weights, EMA, optimizer, data order, every rank's RNG state, the skipped-step count
and the partly accumulated logging interval), so that a killed and resumed run reproduces the
uninterrupted one bit for bit. Metric records written after that checkpoint (by the run that
died) are dropped from ``metrics.jsonl`` and written again as the steps are replayed. The config
is compared key by key with the one the checkpoint's steps were trained under
(:mod:`diffmoe.config.resume` classifies every key): another architecture, objective or data is
refused, other optimisation settings only with ``accept_changes``, and any change is recorded in
``config_history/``. A run with no checkpoint yet starts again from step 0, after moving what
its earlier attempt left to ``previous-<time>/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import yaml

from . import distributed, parallel
from .checkpoint import (
    CHECKPOINTS_DIR,
    LoadedCheckpoint,
    checkpoint_name,
    find_latest_checkpoint,
    list_checkpoints,
    load_state_dict_checked,
    optimizer_from_tensors,
    optimizer_to_tensors,
    parts_held,
    prune_checkpoints,
    remove_incomplete,
    save_checkpoint,
    save_sharded_checkpoint,
    verify_checkpoint,
)
from .config import Config, TrainConfig, load_yaml
from .config.keys import ARCHITECTURE, DATA, OBJECTIVE, OPTIMISATION, REFUSED
from .config.resume import Change, config_changes
from .config.schedule import learning_rate
from .data import BatchIterator
from .errors import CheckpointError, DiffMoEError, TrainingError
from .fileio import atomic_write, atomic_write_text
from .images import grid_classes, save_grid
from .paths import (
    DISK_FULL,
    DirectoryLock,
    LockHeld,
    NotALockFile,
    disk_of,
    file_in_the_way,
    holds_something,
    missing_dirs,
    remove_empty_dirs,
    stamped,
)
from .trackers import DIRS as TRACKER_DIRS
from .trackers import Trackers, check_installed

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONFIG_FILE = "config.yaml"
HISTORY_DIR = "config_history"
METRICS_FILE = "metrics.jsonl"
SET_ASIDE_FILE = "metrics.set-aside.txt"
LOG_FILE = "train.log"
SAMPLES_DIR = "samples"
GRID_CLASSES_FILE = "grid_classes.json"  # in SAMPLES_DIR
LOCK_FILE = "train.lock"
PREVIOUS_PREFIX = "previous"
DIFFERENT = {ARCHITECTURE: "a different architecture", OBJECTIVE: "a different objective",
             DATA: "different data"}
# What a new run writes (name -> is a directory) and so refuses to find holding something.
OUTPUTS = {CONFIG_FILE: False, HISTORY_DIR: True, METRICS_FILE: False, SET_ASIDE_FILE: False,
           SAMPLES_DIR: True, CHECKPOINTS_DIR: True}
# ... and the folders of its trackers: those of train.trackers for a new run; any of them for the
# earlier attempt of a run that starts again.
ALL_OUTPUTS = {**OUTPUTS, **{name: True for name in TRACKER_DIRS.values()}}
# The files of a checkpoint that a resume restores (TrainingState).
RESUMED_FILES = ("model", "ema", "optimizer", "rng")
# ... and what it writes besides (name -> is a directory).
RUN_FILES = {LOG_FILE: False, f"{SAMPLES_DIR}/{GRID_CLASSES_FILE}": False}


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


@dataclass
class Opening:
    """What :meth:`RunDirectory.open` found, for :meth:`RunDirectory.begin` to act on."""

    resume: bool = False
    checkpoint: Optional[Path] = None
    step: int = 0  # the checkpoint's
    trained_under: dict = field(default_factory=dict)  # the config of the checkpoint's steps
    data: Optional[dict] = None  # the checkpoint's record of its data (RunDirectory.check_data)
    changes: list[Change] = field(default_factory=list)  # from trained_under to this config
    earlier_attempt: list[str] = field(default_factory=list)  # names a restart moves aside
    keep_in: Optional[Path] = None  # where it moves them


class _HeldRecords(logging.Handler):
    """Log records kept until the run's train.log may be written."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def optimizer_settings(t: TrainConfig) -> dict:
    """The AdamW hyper-parameters the config sets (a resumed optimizer takes them from the
    config, not from its checkpoint)."""
    return dict(lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)


def words(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def listing(names: list[str]) -> str:
    return words([f"{name}/" if ALL_OUTPUTS.get(name) else name for name in names])


def record_step(line: bytes) -> Optional[int]:
    """The step of a metric record (a JSON object with an integer ``step``), else None."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def history_entries(history: Path) -> dict[int, Path]:
    """step -> file of each config in ``history`` (``step_XXXXXXXX.yaml``)."""
    found = {}
    for path in history.glob("step_*.yaml") if history.is_dir() else ():
        digits = path.stem.removeprefix("step_")
        if digits.isdigit():
            found[int(digits)] = path
    return found


def history_text(step: int, yaml_text: str, changes: list[Change]) -> str:
    """A config of the history: a comment saying from which step it holds and what changed."""
    changed = f"; changed then: {'; '.join(map(str, changes))}" if changes else ""
    return f"# the config of this run from step {step} on{changed}\n{yaml_text}"


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
    """``train.out_dir`` of one run, as seen by rank ``dist.rank`` (rank 0 holds the lock and
    writes). :meth:`open` checks, :meth:`begin` writes, :meth:`close` lets go."""

    def __init__(self, cfg: Config, dist: distributed.DistInfo, device: torch.device):
        self.cfg = cfg
        self.dist = dist
        self.device = device
        self.path = Path(cfg.train.out_dir)
        self.ckpt_root = self.path / CHECKPOINTS_DIR
        self.metrics_path = self.path / METRICS_FILE
        self.samples_path = self.path / SAMPLES_DIR
        self.lock = DirectoryLock(self.path / LOCK_FILE)
        self.opening = Opening()
        self.log_handler: Optional[logging.Handler] = None
        self.held_log: Optional[_HeldRecords] = None
        self.created: list[Path] = []  # directories open() made, removed if the run never began
        self.begun = False
        self.grid_classes: Optional[list[int]] = None  # the sample grids' columns (open())
        self.trackers = Trackers()  # rank 0's dashboards, from begin() on
        self.data: dict = {}  # what the run trains on, recorded in each checkpoint (check_data)

    # -- start or resume --------------------------------------------------------------------

    def open(self, resume: bool, accept_changes: bool = False) -> Optional[Path]:
        """Check, before any work, that this run may write here: the path, the lock, and for a
        new run that none of its outputs holds something already, or with ``resume`` which
        checkpoint it continues from and that the config may continue it (other optimisation
        settings only with ``accept_changes``), and that the trackers' packages are installed.
        Writes nothing but the lock. Returns that checkpoint (None: a new run, or one that starts
        again from step 0)."""
        check_installed(self.cfg.train.trackers)
        self._check_path()
        if self.dist.is_main:
            self.held_log = _HeldRecords()
            logging.getLogger("diffmoe").addHandler(self.held_log)
        self._claim()
        self._refuse_wrong_kinds()
        self.opening.resume = resume
        latest = None
        if not resume:
            self._refuse_outputs_in_the_way()
        else:
            latest = self._checkpoint_to_resume()
            if latest is None:
                self._plan_restart()
            else:
                self._check_config(latest, accept_changes)
        self.grid_classes = self._grid_classes(recorded=latest is not None)
        return latest

    def _check_path(self) -> None:
        blocker = file_in_the_way(self.path)
        if blocker is not None:
            raise DiffMoEError(f"train.out_dir '{self.path}' cannot be created: '{blocker}' is "
                               f"a file, not a directory; set train.out_dir to a directory")

    def _claim(self) -> None:
        """Rank 0 creates the directory and takes its lock; every rank learns whether it
        could, and stops with the same line if not."""
        problem = None
        if self.dist.is_main:
            try:
                self._lock()
            except DiffMoEError as exc:
                problem = str(exc)
        problem = distributed.gather_objects(problem)[0]
        if problem is not None:
            raise DiffMoEError(problem)

    def _lock(self) -> None:
        self.created = missing_dirs(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            stale = self.lock.acquire()
        except LockHeld as exc:
            raise DiffMoEError(f"run directory '{self.path}' is in use by another training "
                               f"({exc.holder or 'its lock file names no holder'}); wait for it "
                               f"to end or set train.out_dir to another directory") from None
        except NotALockFile:
            raise DiffMoEError(f"'{self.lock.path}' is not a diffmoe lock file, and a training "
                               f"keeps its lock there; move it away or set train.out_dir to "
                               f"another directory") from None
        except OSError as exc:
            raise DiffMoEError(f"train.out_dir '{self.path}' cannot be written "
                               f"({exc.strerror or exc}); choose a directory you can write "
                               f"to") from None
        if stale is not None:
            log.warning("run directory '%s': the training that held it (%s) ended without "
                        "letting go of it (it was killed); taking it over", self.path, stale)

    def _refuse_wrong_kinds(self) -> None:
        """Each name the run writes is, where it exists, the kind of entry the run writes there
        (a file or a directory), so that a start or resume is refused before it records
        anything rather than failing at the first write."""
        for name, is_dir in {**RUN_FILES, **ALL_OUTPUTS}.items():
            path = self.path / name
            if path.exists() and path.is_dir() != is_dir:
                found = "a directory" if path.is_dir() else "a file"
                raise DiffMoEError(f"'{path}' is {found}, where the run keeps its {name} "
                                   f"({'a directory' if is_dir else 'a file'}); move it away "
                                   f"or set train.out_dir to another directory")

    def _holds_a_run(self) -> bool:
        """A run was started here: it has a checkpoint, or a config.yaml and train.log."""
        return bool(list_checkpoints(self.ckpt_root)) or all(
            (self.path / name).is_file() for name in (CONFIG_FILE, LOG_FILE))

    def _refuse_outputs_in_the_way(self) -> None:
        outputs = {**OUTPUTS, **{TRACKER_DIRS[name]: True for name in self.cfg.train.trackers}}
        found = [name for name, is_dir in outputs.items()
                 if holds_something(self.path / name, is_dir)]
        if found and self._holds_a_run():
            raise DiffMoEError(
                f"run directory '{self.path}' already holds a run; add --resume to continue it "
                f"or set train.out_dir to a new directory")
        if found:
            raise DiffMoEError(
                f"train.out_dir '{self.path}' already holds {listing(found)}, which a new run "
                f"writes; move {'it' if len(found) == 1 else 'them'} away or set train.out_dir "
                f"to a new directory")

    def _checkpoint_to_resume(self) -> Optional[Path]:
        if list_checkpoints(self.ckpt_root):
            latest = find_latest_checkpoint(self.ckpt_root, check_hashes=True)
            if latest is None:
                raise CheckpointError(f"--resume: every checkpoint in '{self.ckpt_root}' is "
                                      f"damaged; start a new run in another train.out_dir")
            return latest
        if not self._holds_a_run():
            raise DiffMoEError(f"--resume: '{self.path}' holds no run to resume (no checkpoint, "
                               f"no {CONFIG_FILE} and {LOG_FILE}); start a new run there without "
                               f"--resume")
        return None

    def _plan_restart(self) -> None:
        """A run with no checkpoint starts again from step 0; what its earlier attempt wrote
        (and this run would write again) is to be kept under ``previous-<time>/``."""
        o = self.opening
        o.earlier_attempt = [name for name, is_dir in ALL_OUTPUTS.items()
                             if name != CHECKPOINTS_DIR and holds_something(self.path / name,
                                                                           is_dir)]
        if CONFIG_FILE in o.earlier_attempt and self._config_file_is_current():
            o.earlier_attempt.remove(CONFIG_FILE)
        kept = ""
        if o.earlier_attempt:
            o.keep_in = stamped(self.path / PREVIOUS_PREFIX)
            kept = f"; what the earlier attempt wrote ({listing(o.earlier_attempt)}) is kept " \
                   f"in '{o.keep_in}'"
        log.warning("--resume: '%s' has no checkpoint (the run stopped before its first, or its "
                    "checkpoints were removed); starting it again from step 0%s", self.path, kept)

    def _check_config(self, latest: Path, accept_changes: bool) -> None:
        """Compare this config with the one the checkpoint's steps were trained under, or with
        the one an earlier resume from the same step accepted."""
        o = self.opening
        state = verify_checkpoint(latest, check_hashes=False)
        o.checkpoint, o.step = latest, int(state["step"])
        o.trained_under = state.get("config", {})
        o.data = state.get("data")
        missing = [name for name in RESUMED_FILES if name not in parts_held(state)]
        if missing:
            raise CheckpointError(
                f"--resume: checkpoint '{latest}' holds no {words(missing)} state (a model "
                f"written by import-official holds weights only), so no training continues from "
                f"it; sample or evaluate it, or start a new run in another train.out_dir")
        accepted = self.path / HISTORY_DIR / f"{checkpoint_name(o.step)}.yaml"
        reference = load_yaml(accepted) if accepted.is_file() else o.trained_under
        current = self.cfg.to_dict()
        if self.cfg.train.steps < o.step:
            raise DiffMoEError(
                f"--resume: the run is at step {o.step} ({latest}) and train.steps="
                f"{self.cfg.train.steps} is below it: a run is never trained backwards; set "
                f"train.steps above {o.step} to train on, or sample an earlier checkpoint of "
                f"the run with diffmoe sample")
        changes = config_changes(reference, current)
        # A moved folder or cache (data.path) is the same data if it holds the same images,
        # which check_data tells once the dataset is open.
        moved = o.data is not None and o.data.get("contents") is not None
        refused = [c for c in changes if c.kind in REFUSED
                   and not (c.key == "data.path" and moved)]
        if refused:
            kinds = [DIFFERENT[kind] for kind in REFUSED if any(c.kind == kind for c in refused)]
            raise CheckpointError(
                f"checkpoint '{latest}' was trained with {words(kinds)}: "
                f"{'; '.join(map(str, refused[:3]))}; resume with the run's config.yaml")
        optimisation = [c for c in changes if c.kind == OPTIMISATION]
        if optimisation and not accept_changes:
            raise DiffMoEError(
                f"--resume: checkpoint '{latest}' was trained with other optimisation settings: "
                f"{'; '.join(map(str, optimisation[:3]))}"
                f"{self._rate_note(reference, changes)}; add --accept-changes to train on with "
                f"them (each config is kept in {self.path / HISTORY_DIR}), or resume with the "
                f"run's config.yaml")
        if changes:
            log.warning("resuming from step %d with changed settings: %s%s", o.step,
                        "; ".join(map(str, changes)), self._rate_note(reference, changes))
        o.changes = config_changes(o.trained_under, current)

    def _rate_note(self, reference: dict, changes: list[Change]) -> str:
        """What a moved end of a cosine schedule (train.steps) does to the learning rate of
        the next step, which the value of train.lr does not show ("" for no such change)."""
        if not any(c.key == "train.steps" and c.kind == OPTIMISATION for c in changes):
            return ""
        t, step = self.cfg.train, self.opening.step
        names = {f.name for f in fields(TrainConfig)}
        then = TrainConfig(**{k: v for k, v in reference.get("train", {}).items() if k in names})
        before, after = learning_rate(step, then), learning_rate(step, t)
        if math.isclose(before, after):
            return ""
        return f"; the learning rate of step {step + 1} goes from {before:.3g} to {after:.3g}"

    def check_data(self, num_images: int, contents: Optional[str],
                   class_names: Sequence[str] = ()) -> None:
        """Record the dataset the run trains on (its size, for a folder or a latent cache which
        files it holds, and the names of its classes, for a pipeline's ``id2label``) and refuse
        a resume whose dataset is not the one the checkpoint recorded: its data order and its
        steps belong to those images. Before :meth:`begin`."""
        self.data = {"images": num_images, "contents": contents}
        then = self.opening.data
        same = then is None or {key: then.get(key) for key in self.data} == self.data
        self.data["class_names"] = list(class_names)
        if same:
            return
        d = self.cfg.data
        where = f"data.path '{d.path}'" if d.path else f"data.name={d.name}"
        held = (f"{then['images']} images then and {num_images} now" if
                then["images"] != num_images else f"{num_images} images, but not the same ones")
        raise CheckpointError(
            f"checkpoint '{self.opening.checkpoint}' was trained with different data: {where} "
            f"held {held} (images added, removed or changed); put back the images the run was "
            f"trained on, or start a new run in another train.out_dir")

    def begin(self, step: int) -> None:
        """Write what the run starts with, once :meth:`open` has checked everything and the
        trainer is built at ``step``: on resume, remove what an interrupted checkpoint save
        left, move a restarted run's earlier attempt aside, rewind metrics.jsonl and record a
        changed config; then config.yaml, and the log goes to train.log from here on (with
        what was logged since :meth:`open`). Collective: rank 0 writes."""
        if self.dist.is_main:
            if self.opening.resume:
                remove_incomplete(self.ckpt_root)
                self._keep_earlier_attempt()
                self.rewind_metrics(step)
                self._record_config()
            if not self._config_file_is_current():
                atomic_write_text(self.path / CONFIG_FILE, self.cfg.to_yaml())
            self._log_here()
            self._record_grid_classes()
            self.trackers = Trackers.open(self.cfg, self.path,
                                          step if self.opening.checkpoint is not None else None)
        self.begun = True
        distributed.barrier()

    def _config_file_is_current(self) -> bool:
        """config.yaml holds this run's config already."""
        path = self.path / CONFIG_FILE
        return path.is_file() and path.read_bytes() == self.cfg.to_yaml().encode()

    def _keep_earlier_attempt(self) -> None:
        o = self.opening
        if not o.earlier_attempt:
            return
        o.keep_in.mkdir()
        for name in o.earlier_attempt:
            os.rename(self.path / name, o.keep_in / name)

    def _record_config(self) -> None:
        """Keep the config in config_history/ from the checkpoint's step on if it differs from
        the one that step was trained under, after the config from step 0 (config.yaml, in a
        run with no history yet); forget configs of steps that are trained again."""
        o = self.opening
        if o.checkpoint is None:
            return
        history = self.path / HISTORY_DIR
        entries = history_entries(history)
        for step, path in sorted(entries.items()):
            if step > o.step or (step == o.step and not o.changes):
                path.unlink()
                log.info("%s: removed %s, the config of steps trained again", HISTORY_DIR, path)
        if not o.changes:
            return
        history.mkdir(exist_ok=True)
        if o.step > 0 and not any(step < o.step for step in entries):
            config_path = self.path / CONFIG_FILE
            first = (config_path.read_text() if config_path.is_file()
                     else yaml.safe_dump(o.trained_under, sort_keys=False))
            atomic_write_text(history / f"{checkpoint_name(0)}.yaml", history_text(0, first, []))
        path = history / f"{checkpoint_name(o.step)}.yaml"
        atomic_write_text(path, history_text(o.step, self.cfg.to_yaml(), o.changes))
        log.info("the config from step %d on is recorded in %s", o.step, path)

    def _log_here(self) -> None:
        """Copy the library's log to train.log until :meth:`close`, starting with what was
        held since :meth:`open`."""
        self.log_handler = logging.FileHandler(self.path / LOG_FILE)
        self.log_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        if self.held_log is not None:
            logging.getLogger("diffmoe").removeHandler(self.held_log)
            for record in self.held_log.records:
                self.log_handler.handle(record)
            self.held_log = None
        logging.getLogger("diffmoe").addHandler(self.log_handler)

    def close(self) -> None:
        """Stop writing to train.log (later runs in this process must not log into this one),
        let go of the lock, and remove the directories :meth:`open` created for a run that
        never began. The trackers are closed first."""
        self.trackers.close()
        for handler in (self.log_handler, self.held_log):
            if handler is not None:
                logging.getLogger("diffmoe").removeHandler(handler)
                handler.close()
        self.log_handler = self.held_log = None
        self.lock.release()
        if not self.begun:
            remove_empty_dirs(self.created)

    # -- checkpoints ------------------------------------------------------------------------

    def last_good_checkpoint(self) -> str:
        latest = find_latest_checkpoint(self.ckpt_root, check_hashes=False)
        return str(latest) if latest is not None else "none (no checkpoint written yet)"

    def save(self, s: TrainingState) -> Optional[Path]:
        """Checkpoint ``s`` at its step. Under torchrun it is collective and sharded: every rank
        writes its own part (:func:`save_sharded_checkpoint`); a single process writes one
        safetensors file per part."""
        rng_all = distributed.gather_objects(rng_state(self.device))
        sums_all = distributed.gather_objects(s.progress.interval_sums.tolist())
        rng = {f"rank{r}.{k}": v for r, st in enumerate(rng_all) for k, v in st.items()}
        state = {"config": self.cfg.to_dict(), "loader": s.loader.state_dict(),
                 "world_size": self.dist.world_size, "skipped_steps": s.progress.skipped_steps,
                 "data": self.data,
                 "interval": {"sums": sums_all, "good": int(s.progress.interval_good)}}
        step, module = s.progress.step, s.model.module
        if self.dist.enabled:
            parts = parallel.sharded_parts(module, s.ema, s.optimizer)
            path = self._write_checkpoint(lambda: save_sharded_checkpoint(
                self.ckpt_root, step, parts, {"rng": rng}, state), step)
        else:
            opt_tensors, state["optimizer"] = optimizer_to_tensors(s.optimizer.state_dict())
            files = {"model": module.state_dict(), "ema": s.ema.state_dict(),
                     "optimizer": opt_tensors, "rng": rng}
            path = self._write_checkpoint(
                lambda: save_checkpoint(self.ckpt_root, step, files, state), step)
        if self.dist.is_main:
            prune_checkpoints(self.ckpt_root, self.cfg.train.keep_checkpoints)
            log.info("saved checkpoint %s", path)
        distributed.barrier()
        return path

    def _write_checkpoint(self, write: Callable[[], Optional[Path]], step: int
                          ) -> Optional[Path]:
        """``write()`` the checkpoint of ``step``; a full disk stops the run with one line naming
        the disk (the checkpoints already written are untouched)."""
        try:
            return write()
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            raise TrainingError(
                f"no space left on the disk holding '{self.ckpt_root}' ({disk_of(self.ckpt_root)})"
                f" while writing the checkpoint of step {step}; it was not written, and the last "
                f"good checkpoint is {self.last_good_checkpoint()}; free space there (or lower "
                f"train.keep_checkpoints), then resume with --resume") from None

    def load(self, path: Path, s: TrainingState) -> None:
        """Restore ``s`` from the checkpoint ``path`` (chosen by :meth:`open`, which checked
        every hash and the config), with the optimizer's hyper-parameters from this config. A
        sharded checkpoint loads at any world size and under any engine; one of safetensors
        files (a single process's, or written before sharding) is loaded whole on every rank."""
        ckpt = LoadedCheckpoint(path, verify_checkpoint(path, check_hashes=False), verified=True)
        fsdp, module = s.model.fsdp, s.model.module
        if ckpt.sharded:
            parallel.load_sharded(ckpt, module, s.ema, s.optimizer)
        else:
            for name, target in (("model", module), ("ema", s.ema)):
                load_state_dict_checked(target, ckpt.tensors(name), f"'{path}' ({name})",
                                        parallel.load_full_model_state(target) if fsdp else None)
            opt_state = optimizer_from_tensors(ckpt.tensors("optimizer"),
                                               ckpt.state["optimizer"])
            if fsdp:
                parallel.load_full_optimizer_state(module, s.optimizer, opt_state)
            else:
                s.optimizer.load_state_dict(opt_state)
        for group in s.optimizer.param_groups:
            group.update(optimizer_settings(self.cfg.train))
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
        """Append ``record`` to metrics.jsonl and hand it to the trackers."""
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.trackers.metrics(record)

    def save_samples(self, images: torch.Tensor, step: int, nrow: Optional[int]) -> Path:
        """Write the sample grid of ``step`` to samples/ and hand it to the trackers."""
        path = save_grid(images, self.samples_path / f"step_{step:08d}.png", nrow=nrow, upscale=2)
        log.info("wrote samples %s", path)
        self.trackers.image(path, step)
        return path

    # -- the classes of the sample grids ----------------------------------------------------

    def _grid_classes(self, recorded: bool) -> Optional[list[int]]:
        """The class of each column of this run's sample grids (None for a text model): read
        from samples/grid_classes.json when resuming from a checkpoint (``recorded``), so that
        every grid of a run shows the same classes, else :func:`images.grid_classes`."""
        m = self.cfg.model
        if m.condition != "class":
            return None
        path = self.samples_path / GRID_CLASSES_FILE
        if not (recorded and path.is_file()):
            return grid_classes(m.num_classes, self.cfg.train.seed)
        try:
            classes = json.loads(path.read_text())["classes"]
            valid = (isinstance(classes, list) and bool(classes) and all(
                type(c) is int and 0 <= c < m.num_classes for c in classes))
        except (OSError, ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            raise DiffMoEError(f"'{path}' holds no list of classes below model.num_classes="
                               f"{m.num_classes} for the sample grids; delete it (the resume "
                               f"chooses them again from train.seed)")
        return classes

    def _record_grid_classes(self) -> None:
        path = self.samples_path / GRID_CLASSES_FILE
        if self.grid_classes is None or path.is_file():
            return
        self.samples_path.mkdir(exist_ok=True)
        atomic_write_text(path, json.dumps({"classes": self.grid_classes}) + "\n")
        if self.cfg.model.num_classes > len(self.grid_classes):
            log.info("sample grids show classes %s, one per column (%s)", self.grid_classes, path)

    def rewind_metrics(self, step: int) -> None:
        """Drop metric records past ``step``: the resumed run replays those steps and writes
        them again. Lines that are no metric record (a user's, or one cut short by a crash) are
        moved to metrics.set-aside.txt, never dropped."""
        if not self.metrics_path.is_file():
            return
        original = self.metrics_path.read_bytes()
        lines = [line for line in original.split(b"\n") if line.strip()]
        keep, others, replayed = [], [], 0
        for line in lines:
            recorded = record_step(line)
            if recorded is None:
                others.append(line)
            elif recorded <= step:
                keep.append(line)
            else:
                replayed += 1
        if others:
            with open(self.path / SET_ASIDE_FILE, "ab") as fh:
                fh.write(b"".join(line + b"\n" for line in others))
                fh.flush()
                os.fsync(fh.fileno())
            log.warning("metrics.jsonl: moved %d line(s) that are no metric record to %s",
                        len(others), self.path / SET_ASIDE_FILE)
        data = b"".join(line + b"\n" for line in keep)
        if data != original:
            atomic_write(self.metrics_path, lambda tmp: tmp.write_bytes(data), durable=True)
        if replayed:
            log.info("metrics.jsonl: dropped %d record(s) written after step %d by the "
                     "interrupted run; those steps are replayed", replayed, step)
