from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


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
    return ROOT / "configs" / "digits_tiny.yaml"
