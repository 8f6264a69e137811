"""Data-parallel training with 2 CPU processes (gloo) under torchrun, with faults: a NaN on one
rank (skipped on both), a rank killed with SIGKILL (the run ends promptly with a message and
resumes exactly), and a rank that hangs (the others stop after train.dist_timeout_s)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffmoe.checkpoint import checkpoint_name, list_checkpoints

HERE = Path(__file__).parent
CONFIG = HERE.parent / "configs" / "digits_tiny.yaml"
TIMEOUT_S = 300
STEPS = 6
# Every run injects a NaN into rank 1's batch at step 3 and skips it: both ranks must skip it
# together (one rank stepping alone would hang or desynchronise the other).
NAN = "nan:3:1"
COMMON = {"train.steps": STEPS, "train.ckpt_every": 2, "train.log_every": 2,
          "train.sample_every": 3, "train.nonfinite_loss": "skip", "sample.steps": 1,
          "sample.num": 4, "sample.batch_size": 4}
HANG_TIMEOUT_S = 8  # train.dist_timeout_s for the hung-rank test
# A run whose rank died must end this soon (torchrun start-up included, on a busy 2-core host).
PROMPT_END_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(run_dir: Path, **extra) -> list[str]:
    return [f"{k}={v}" for k, v in dict(COMMON, **{"train.out_dir": run_dir}, **extra).items()]


def torchrun(args: list[str], faults: str = "") -> tuple[subprocess.CompletedProcess, float]:
    """Run ``args`` under 2-process torchrun; returns the process and its wall time."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent),
               DIFFMOE_FAULTS=faults)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())] + args
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc, time.perf_counter() - start


def train_cli(run_dir: Path, faults: str, *extra: str, **config) -> tuple[
        subprocess.CompletedProcess, float]:
    return torchrun([str(HERE / "fault_runner.py"), "train", str(CONFIG),
                     *overrides(run_dir, **config), *extra], faults)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run (through tests/ddp_check.py, which also checks that the ranks
    agree); its report is beside it as ddp.json."""
    root = tmp_path_factory.mktemp("ddp")
    proc, _ = torchrun([str(HERE / "ddp_check.py"), str(CONFIG), str(root / "ddp.json"),
                        *overrides(root / "run")], NAN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_in_sync(reference):
    report = json.loads((reference.parent / "ddp.json").read_text())
    assert report["world_size"] == 2 and report["num_thresholds"] == 1
    # Thresholds moved away from 0, and every tensor (weights, EMA, thresholds) is identical on
    # both ranks although each rank saw different data, buffers are not broadcast, and rank 1 alone
    # had a NaN loss at step 3.
    assert report["threshold_sum"] > 0
    for rank_report in report["ranks"]:
        differing = [k for k, v in rank_report.items() if not v]
        assert rank_report and not differing, differing
    records = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(2, 0), (4, 1), (6, 1)]


@pytest.mark.slow
def test_ddp_killed_rank_ends_run_with_message_then_resumes_exactly(reference, tmp_path):
    run = tmp_path / "run"
    # Rank 1 is SIGKILLed in the middle of step 5; the last checkpoint is step 4's.
    killed, seconds = train_cli(run, f"{NAN},kill:5:1")
    assert killed.returncode != 0 and seconds < PROMPT_END_S, (seconds, killed.stderr[-3000:])
    # torchrun's summary names the dead rank and the signal; rank 0 says which step it was at
    # and where to resume from (it either saw the connection drop or got torchrun's SIGTERM).
    assert "rank      : 1" in killed.stderr and "SIGKILL" in killed.stderr
    last = run / "checkpoints" / checkpoint_name(4)
    rank0 = [line for line in error_lines(killed) if f"last good checkpoint: {last}" in line]
    # Rank 1 died after step 5's collectives, so rank 0 finishes step 5 and fails in step 6's.
    assert rank0 and re.search(r"rank 0: lost contact with another rank at step 6 \(|stopped by "
                               r"SIGTERM at step [45] ", rank0[0]), killed.stderr[-3000:]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [
        checkpoint_name(2), checkpoint_name(4)]

    resumed, _ = train_cli(run, NAN, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (r / "checkpoints" / checkpoint_name(STEPS) for r in (reference, run))
    state = json.loads((b / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == STEPS and state["skipped_steps"] == 1
    for name in ("model", "ema", "optimizer", "rng"):
        ta, tb = (load_file(str(p / f"{name}.safetensors")) for p in (a, b))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    strip = ("images_per_sec", "elapsed_s")
    records = [[{k: v for k, v in json.loads(x).items() if k not in strip}
                for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (reference, run)]
    assert records[0] == records[1]


@pytest.mark.slow
def test_ddp_hung_rank_stops_run_after_the_timeout(tmp_path):
    run = tmp_path / "run"
    proc, seconds = train_cli(run, "hang:3:1", **{"train.dist_timeout_s": HANG_TIMEOUT_S})
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert HANG_TIMEOUT_S < seconds < HANG_TIMEOUT_S + PROMPT_END_S, seconds
    lines = error_lines(proc)
    assert any(line.startswith("error: rank 0: lost contact with another rank at step")
               and f"Timed out waiting {HANG_TIMEOUT_S * 1000}ms" in line
               and f"last good checkpoint: {run / 'checkpoints' / checkpoint_name(2)}" in line
               for line in lines), proc.stderr[-3000:]
