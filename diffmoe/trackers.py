"""Dashboards of a training run (``train.trackers``): TensorBoard event files in
``<out_dir>/tensorboard/`` and an offline W&B run in ``<out_dir>/wandb/``.

They are side channels of the run directory, which stays the truth: :class:`Trackers` only
receives what :class:`~diffmoe.run.RunDirectory` writes there (each ``metrics.jsonl`` record, the
config, each sample grid PNG) and builds nothing of its own.

Resume. A resumed run replays the steps after its checkpoint (step S), and the run that died may
have logged some of them already. metrics.jsonl drops those records (``rewind_metrics``);
TensorBoard's event files are only ever appended to, so the resumed writer opens with a
``purge_step`` of S + 1: a restart marker telling TensorBoard to drop every event of an earlier
file at step S + 1 or later, and a new run opens with one at step 0, so that TensorBoard takes
each later marker for a restart. W&B offline has no such rewind: each attempt is an offline run
directory of its own, under the same run id, that holds the steps it trained.

W&B never touches the network here: the run is offline (``wandb sync <out_dir>/wandb/offline-run-*``
uploads it later, from any machine).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
from PIL import Image

from .config import Config
from .errors import ConfigError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # the folder W&B makes under the ``dir`` it is given
DIRS = {"tensorboard": TENSORBOARD_DIR, "wandb": WANDB_DIR}  # tracker -> its folder in out_dir
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the package it needs
INSTALL = "pip install 'diffmoe[trackers]' (make install does)"
WANDB_OFFLINE_PREFIX = "offline-run-"  # W&B's offline run folders: offline-run-<time>-<run id>
CONFIG_TAG = "config"
GRID_TAG = "samples"


def package_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_installed(trackers: list[str]) -> None:
    """Every package ``trackers`` needs can be imported; else one line naming them."""
    missing = [PACKAGES[name] for name in trackers if not package_installed(PACKAGES[name])]
    if missing:
        them = "it" if len(missing) == 1 else "them"
        raise ConfigError(
            f"train.trackers={trackers} needs the {' and '.join(missing)} package"
            f"{'s' if len(missing) > 1 else ''}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed; install {them} with {INSTALL}, or take {them} out of "
            f"train.trackers")


def numbers(record: dict) -> dict[str, float]:
    """The fields of a metrics record that are numbers, but its step (a null is left out)."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def read_grid(path: Path) -> np.ndarray:
    """A sample grid PNG as an (H, W, 3) uint8 array."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class Tracker(Protocol):
    def metrics(self, record: dict) -> None: ...

    def image(self, path: Path, step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files in ``run_dir/tensorboard``: a scalar per metrics field (its name as the tag),
    the sample grids (tag ``samples``) and the config as text (tag ``config``) at ``first_step``,
    the first step this process trains (0 for a new run)."""

    def __init__(self, run_dir: Path, first_step: int, config_yaml: str):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / TENSORBOARD_DIR
        self.writer = SummaryWriter(str(self.path), purge_step=first_step)
        self.writer.add_text(CONFIG_TAG, f"```yaml\n{config_yaml}```", first_step)
        self.writer.flush()
        log.info("TensorBoard: %s (view it with tensorboard --logdir %s)", self.path, self.path)

    def metrics(self, record: dict) -> None:
        for key, value in numbers(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def image(self, path: Path, step: int) -> None:
        self.writer.add_image(GRID_TAG, read_grid(path), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def earlier_wandb_id(run_dir: Path) -> Optional[str]:
    """The W&B run id of this run directory's newest offline run, if it has one."""
    runs = sorted(p.name for p in (run_dir / WANDB_DIR).glob(f"{WANDB_OFFLINE_PREFIX}*-*")
                  if p.is_dir())
    return runs[-1].rsplit("-", 1)[1] if runs else None


class WandbTracker:
    """An offline W&B run in ``run_dir/wandb``: the config, every metrics field (logged at the
    record's step) and the sample grids (key ``samples``). A resumed run keeps the run id of the
    directory's earlier offline runs, so that W&B files their steps under one run."""

    def __init__(self, run_dir: Path, cfg: Config):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            mode="offline", dir=str(run_dir), project=cfg.train.wandb_project,
            name=run_dir.resolve().name, id=earlier_wandb_id(run_dir), config=cfg.to_dict(),
            settings=wandb.Settings(console="off", silent=True))
        self.path = Path(self.run.dir).parent
        log.info("W&B (offline): %s (upload it with wandb sync %s)", self.path, self.path)

    def metrics(self, record: dict) -> None:
        self.run.log(numbers(record), step=record["step"])

    def image(self, path: Path, step: int) -> None:
        self.run.log({GRID_TAG: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The dashboards a run feeds (none on ranks other than 0, or without ``train.trackers``)."""

    def __init__(self, trackers: Optional[list[Tracker]] = None):
        self.trackers: list[Tracker] = trackers or []

    @classmethod
    def open(cls, cfg: Config, run_dir: Path, resumed_from: Optional[int]) -> "Trackers":
        """The trackers of ``cfg.train.trackers`` for a run that starts at step 0, or resumes
        from the checkpoint of step ``resumed_from``."""
        opened = cls()
        first_step = 0 if resumed_from is None else resumed_from + 1
        try:
            for name in cfg.train.trackers:
                opened.trackers.append(
                    TensorBoardTracker(run_dir, first_step, cfg.to_yaml()) if name == "tensorboard"
                    else WandbTracker(run_dir, cfg))
        except BaseException:
            opened.close()
            raise
        return opened

    def metrics(self, record: dict) -> None:
        """One record of metrics.jsonl, as written there."""
        for tracker in self.trackers:
            tracker.metrics(record)

    def image(self, path: Path, step: int) -> None:
        """The sample grid PNG ``path`` of step ``step``."""
        for tracker in self.trackers:
            tracker.image(path, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
