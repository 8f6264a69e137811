"""Data-parallel training with 2 CPU processes (gloo) under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from diffmoe.checkpoint import list_checkpoints

HERE = Path(__file__).parent
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_in_sync(tmp_path, tiny_config_path, tiny_overrides):
    result = tmp_path / "ddp.json"
    proc = torchrun([str(HERE / "ddp_check.py"), str(tiny_config_path), str(result)]
                    + tiny_overrides("ddp", **{"train.steps": 5}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(result.read_text())
    assert report["world_size"] == 2 and report["num_thresholds"] == 1
    # Thresholds moved away from 0, and every tensor (weights, EMA, thresholds) is identical on
    # both ranks although each rank saw different data and buffers are not broadcast.
    assert report["threshold_sum"] > 0
    for rank_report in report["ranks"]:
        differing = [k for k, v in rank_report.items() if not v]
        assert rank_report and not differing, differing


@pytest.mark.slow
def test_ddp_cli_run_and_resume(tmp_path, tiny_config_path, tiny_overrides):
    args = ["-m", "diffmoe", "train", str(tiny_config_path)]
    first = torchrun(args + tiny_overrides("cli", **{"train.steps": 4, "train.ckpt_every": 2}))
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "cli"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [
        "step_00000002", "step_00000004"]
    again = torchrun(args + tiny_overrides("cli", **{"train.steps": 6}) + ["--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    state = json.loads((run / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 6
