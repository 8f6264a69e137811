from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

TINY_CONFIG = ROOT / "configs" / "digits_tiny.yaml"
# A finished run in seconds: two optimizer steps, a checkpoint and a sample grid at the end.
TINY_RUN = {"train.steps": 2, "train.ckpt_every": 2, "train.sample_every": 2, "sample.steps": 1,
            "sample.num": 4, "sample.batch_size": 4}


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on a machine without a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check runs it)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that make configs/digits_tiny.yaml a run of a few seconds in tmp_path."""
    def make(name="run", **extra):
        base = {"train.out_dir": str(tmp_path / name), "train.steps": 6, "train.log_every": 2,
                "train.sample_every": 3, "train.ckpt_every": 3, "sample.steps": 2,
                "sample.num": 10, "sample.batch_size": 10}
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]
    return make


@pytest.fixture
def tiny_config_path():
    return TINY_CONFIG


@pytest.fixture(scope="session")
def train_tiny(tmp_path_factory):
    """``train_tiny(*overrides, config=TINY_CONFIG)``: the run directory of a finished
    :data:`TINY_RUN` of ``config`` (digits_tiny by default) in a fresh temporary directory, with
    ``overrides`` (``key=value`` strings) applied last. Usable from fixtures of any scope."""
    from diffmoe.config import load_config
    from diffmoe.train import train

    def run(*overrides: str, config: Path = TINY_CONFIG) -> Path:
        out = tmp_path_factory.mktemp("tiny") / "run"
        settings = [f"{k}={v}" for k, v in TINY_RUN.items()]
        return train(load_config(config, [f"train.out_dir={out}", *settings, *overrides])).run_dir
    return run
