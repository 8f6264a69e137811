"""Data-parallel training with 2 CPU processes (gloo) under torchrun, with faults: a NaN on one
rank (skipped on both), a rank killed with SIGKILL (the run ends promptly with a message and
resumes exactly), a rank that hangs in a step or at the end (the others stop after
train.dist_timeout_s), and a launcher killed with SIGKILL (no rank is left behind). Every job runs
through tests/jobs.py: a job that hangs fails its test with the stacks of its processes, and one
that leaves a process running fails too."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from jobs import Job, JobHung, Running, job_env, torchrun_cmd

from diffmoe.checkpoint import checkpoint_name, list_checkpoints, open_checkpoint
from diffmoe.distributed import LAUNCHER_GONE_GRACE_S, LAUNCHER_POLL_S

HERE = Path(__file__).parent
CONFIG = HERE.parent / "configs" / "digits_tiny.yaml"
TIMEOUT_S = 180
STEPS = 6
# Every run injects a NaN into rank 1's batch at step 3 and skips it: both ranks must skip it
# together (one rank stepping alone would hang or desynchronise the other).
NAN = "nan:3:1"
COMMON = {"train.steps": STEPS, "train.ckpt_every": 2, "train.log_every": 2,
          "train.sample_every": 3, "train.nonfinite_loss": "skip", "sample.steps": 1,
          "sample.num": 4, "sample.batch_size": 4}
HANG_TIMEOUT_S = 8  # train.dist_timeout_s for the hung-rank tests
# A run whose rank died must end this soon (torchrun start-up included, on a busy 2-core host).
PROMPT_END_S = 60


def overrides(run_dir: Path, **extra) -> list[str]:
    return [f"{k}={v}" for k, v in dict(COMMON, **{"train.out_dir": run_dir}, **extra).items()]


def torchrun(args: list[str], faults: str = "", **env: str) -> tuple[Job, float]:
    """Run ``args`` under 2-process torchrun; returns the job and its wall time."""
    job = Running(torchrun_cmd(args), job_env(DIFFMOE_FAULTS=faults, **env), TIMEOUT_S).finish()
    return job, job.seconds


def train_cli(run_dir: Path, faults: str, *extra: str, **config) -> tuple[Job, float]:
    return torchrun([str(HERE / "fault_runner.py"), "train", str(CONFIG),
                     *overrides(run_dir, **config), *extra], faults)


def error_lines(proc: Job) -> list[str]:
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
def test_teardown_destroys_the_group_and_stops_its_threads(reference):
    """After the teardown no gloo thread is left: the group was destroyed inside it, its last
    reference a Python one. Before the fix the DDP wrapper outlived destroy_process_group, and
    its Reducer dropped the group later from a destructor holding the GIL (the deadlock)."""
    for rank in (0, 1):
        left = json.loads((reference.parent / f"ddp.json.rank{rank}").read_text())
        assert not [t for t in left["os_threads"] if "gloo" in t], left
        assert "diffmoe-launcher-watch" not in left["python_threads"], left


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
    assert state["layout"] == "sharded"  # each rank wrote its part
    for name in ("model", "ema", "optimizer", "rng"):
        ta, tb = (open_checkpoint(p).tensors(name) for p in (a, b))
        # The same computation resumed (same machine, world size and threads): bitwise.
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


@pytest.mark.slow
def test_ddp_rank_missing_at_the_end_stops_the_others_with_one_line(tmp_path):
    run = tmp_path / "run"
    proc, seconds = train_cli(run, "hang-at-exit:6:1", **{"train.dist_timeout_s": HANG_TIMEOUT_S})
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert seconds < HANG_TIMEOUT_S + PROMPT_END_S, seconds
    # Rank 0's line, then rank 1's, which torchrun stopped with SIGTERM once rank 0 had failed.
    assert error_lines(proc) == [
        f"error: rank 0: rank(s) 1 did not reach the end of the run within "
        f"train.dist_timeout_s={HANG_TIMEOUT_S} s after this rank finished at step {STEPS}; they "
        f"died or hung (see their logs); the checkpoint of step {STEPS} was written before, so "
        f"nothing is lost",
        "error: stopped by SIGTERM (the job was cancelled, or another rank failed)"
    ], proc.stderr[-3000:]
    assert list_checkpoints(run / "checkpoints")[-1].name == checkpoint_name(STEPS)


@pytest.mark.slow
def test_killed_launcher_leaves_no_rank_behind(tmp_path):
    """torchrun SIGKILLed (it passes no signal on) while rank 1 hangs in step 3 and rank 0 waits
    for it: the ranks notice they lost their launcher, say so, and end. (Whichever notices first
    ends, which can end the other through its broken collective before its own watch fires.)"""
    run, fired = tmp_path / "run", tmp_path / "fired"
    job = Running(torchrun_cmd([str(HERE / "fault_runner.py"), "train", str(CONFIG),
                                *overrides(run, **{"train.dist_timeout_s": 300})]),
                  job_env(DIFFMOE_FAULTS="hang:3:1", DIFFMOE_FAULT_TIME=str(fired)), TIMEOUT_S)
    deadline = time.monotonic() + TIMEOUT_S
    while not fired.exists():
        assert job.proc.poll() is None and time.monotonic() < deadline, "rank 1 never hung"
        time.sleep(0.1)
    ranks = [pid for pid in job.pids() if pid != job.proc.pid]
    assert len(ranks) == 2, ranks
    job.proc.send_signal(signal.SIGKILL)
    killed_at = time.perf_counter()
    # finish() fails (JobLeftProcesses) if any rank is still running after the grace period.
    done = job.finish(leftover_grace_s=LAUNCHER_POLL_S + LAUNCHER_GONE_GRACE_S + 10)
    ended_after = time.perf_counter() - killed_at
    lines = error_lines(done)
    assert any(re.match(r"error: rank [01]: its launcher \(pid \d+\) is gone", line)
               for line in lines), done.stderr[-3000:]
    # Each rank said why it stopped: its launcher, SIGTERM (sent by its watch), or the other.
    assert len(lines) >= 3, done.stderr[-3000:]
    assert ended_after < LAUNCHER_POLL_S + LAUNCHER_GONE_GRACE_S + 10, ended_after


@pytest.mark.slow
def test_a_hung_job_fails_with_the_stacks_of_its_ranks(tmp_path):
    """The harness itself: a job past its timeout fails with every rank's Python stack and
    leaves nothing running."""
    job = Running(torchrun_cmd([str(HERE / "stuck_ranks.py"), str(tmp_path)]), job_env(),
                  TIMEOUT_S)
    deadline = time.monotonic() + TIMEOUT_S
    while not all((tmp_path / f"rank{r}").exists() for r in (0, 1)):  # both about to be stuck
        assert job.proc.poll() is None and time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.1)
    with pytest.raises(JobHung) as hung:
        job.finish(within_s=3)
    message = str(hung.value)
    assert "did not end within" in message
    assert "in sleep_forever" in message  # rank 1's stack
    assert "in barrier" in message  # rank 0's stack, waiting for it
    assert job.pids() == []
