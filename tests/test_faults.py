"""Fault tests: training killed with SIGKILL (at a random step, or inside a checkpoint write or
prune) resumes to exactly the state of an uninterrupted run, and a non-finite loss stops the run
naming the step and the last good checkpoint, or is skipped and counted.

The killed runs are real subprocesses (tests/fault_runner.py, the CLI with a fault injected) that
die by SIGKILL: no handler, no flush, no cleanup. All runs use one intra-op thread, so results
are bitwise reproducible on a CPU.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jobs
import pytest
import torch
from jobs import Job, job_env
from safetensors import SafetensorError
from safetensors.torch import load_file

import diffmoe.checkpoint as checkpoint
from diffmoe.checkpoint import (
    checkpoint_name,
    find_latest_checkpoint,
    list_checkpoints,
    open_checkpoint,
    verify_checkpoint,
)
from diffmoe.cli import main
from diffmoe.config import load_config
from diffmoe.data import BatchIterator
from diffmoe.errors import CheckpointError, TrainingError
from diffmoe.paths import DirectoryLock
from diffmoe.train import METRIC_FIELDS, train

HERE = Path(__file__).parent
CONFIG = HERE.parent / "configs" / "digits_tiny.yaml"
STEPS = 12
# Checkpoints every 3 steps, logging every 2: a checkpoint falls inside a logging interval, so
# resume must restore the interval's partial sums. Samples every 4 steps use the EMA model between
# checkpoints; keeping 2 checkpoints makes every save prune one.
COMMON = {"train.steps": STEPS, "train.log_every": 2, "train.ckpt_every": 3,
          "train.sample_every": 4, "train.keep_checkpoints": 2, "train.num_threads": 1,
          "sample.steps": 1, "sample.num": 4, "sample.batch_size": 4}
TIMING_FIELDS = ("images_per_sec", "elapsed_s")
RUN_TIMEOUT_S = 120


def overrides(run_dir: Path, **extra) -> list[str]:
    return [f"{k}={v}" for k, v in dict(COMMON, **{"train.out_dir": run_dir}, **extra).items()]


def run_cli(run_dir: Path, faults: str = "", resume: bool = False,
            loss_log: Path | None = None) -> Job:
    """``diffmoe train`` in a subprocess through tests/fault_runner.py with ``faults``."""
    env = job_env(DIFFMOE_FAULTS=faults)
    if loss_log is not None:
        env["DIFFMOE_LOSS_LOG"] = str(loss_log)
    cmd = [sys.executable, str(HERE / "fault_runner.py"), "train", str(CONFIG),
           *overrides(run_dir)] + (["--resume"] if resume else [])
    return jobs.run(cmd, RUN_TIMEOUT_S, env)


def losses(path: Path) -> dict[int, str]:
    """step -> loss (float.hex) from a loss log; a replayed step keeps its last value."""
    out = {}
    for line in path.read_text().splitlines():
        step, value = line.split()
        out[int(step)] = value
    return out


def metric_records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_identical_runs(ref: Path, run: Path) -> None:
    """Same weights, EMA weights, optimizer state, thresholds, RNG states, data position, step,
    metric records and sample grids after STEPS steps, bitwise: a resumed run is the same
    computation as the uninterrupted one (same machine, shapes and thread count)."""
    a = ref / "checkpoints" / checkpoint_name(STEPS)
    b = run / "checkpoints" / checkpoint_name(STEPS)
    for name in ("model", "ema", "optimizer", "rng"):
        ta, tb = (load_file(str(p / f"{name}.safetensors")) for p in (a, b))
        assert ta.keys() == tb.keys(), name
        differing = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not differing, (name, differing[:5])
    thresholds = {k: v for k, v in load_file(str(b / "model.safetensors")).items()
                  if k.endswith("thresholds_E")}
    assert thresholds and all(v.abs().sum() > 0 for v in thresholds.values())
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    for key in ("step", "loader", "optimizer", "skipped_steps", "interval", "world_size"):
        assert sa[key] == sb[key], key
    assert metric_records(ref) == metric_records(run)
    grids_a, grids_b = sorted((ref / "samples").iterdir()), sorted((run / "samples").iterdir())
    assert [p.name for p in grids_a] == [p.name for p in grids_b]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(grids_a, grids_b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """The uninterrupted run, and its per-step losses."""
    root = tmp_path_factory.mktemp("reference")
    proc = run_cli(root / "run", loss_log=root / "losses.txt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_losses = losses(root / "losses.txt")
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    return root / "run", ref_losses


@pytest.fixture
def restore_threads():
    """In-process runs set one intra-op thread (train.num_threads=1); give the rest of the suite
    back its thread count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_kill9_at_random_step_then_resume_is_bitwise_identical(reference, tmp_path):
    # DIFFMOE_KILL_STEP=k picks the step (docs/reliability.md sweeps them all).
    seed = int(os.environ.get("DIFFMOE_FAULT_SEED", time.time_ns() % 2**32))
    kill_step = int(os.environ.get("DIFFMOE_KILL_STEP", 0)) or random.Random(seed).randint(
        1, STEPS - 1)
    context = f"killed at step {kill_step} (DIFFMOE_KILL_STEP={kill_step} repeats this)"
    ref_run, ref_losses = reference
    run, loss_log = tmp_path / "run", tmp_path / "losses.txt"

    killed = run_cli(run, f"kill:{kill_step}", loss_log=loss_log)
    assert killed.returncode == -signal.SIGKILL, (context, killed.stderr[-2000:])
    assert not (run / "checkpoints" / checkpoint_name(STEPS)).exists(), context
    before = losses(loss_log)
    assert max(before) == kill_step, context  # it died inside step kill_step, not later
    last = find_latest_checkpoint(run / "checkpoints")

    resumed = run_cli(run, resume=True, loss_log=loss_log)
    assert resumed.returncode == 0, (context, resumed.stderr[-3000:])
    if last is None:  # killed before the first checkpoint: the run starts again from step 0
        assert kill_step <= COMMON["train.ckpt_every"], context
        assert "has no checkpoint (the run stopped before its first, or its checkpoints were " \
               "removed); starting it again from step 0" in resumed.stderr, context
    else:
        assert f"resumed from {last} at step" in resumed.stderr, context
    assert losses(loss_log) == ref_losses, context
    assert_identical_runs(ref_run, run)


@pytest.mark.slow
def test_sigterm_stops_with_a_message_then_resume_is_bitwise_identical(
        reference, tmp_path, restore_threads):
    """What a scheduler (or torchrun, for the surviving ranks) sends: the run stops with one
    line naming the step and the checkpoint to resume from, and resumes exactly."""
    run, loss_log = tmp_path / "run", tmp_path / "losses.txt"
    env = job_env(DIFFMOE_FAULTS="hang:5", DIFFMOE_LOSS_LOG=str(loss_log))
    job = jobs.Running([sys.executable, str(HERE / "fault_runner.py"), "train", str(CONFIG),
                        *overrides(run)], env, RUN_TIMEOUT_S)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (loss_log.exists() and 5 in losses(loss_log)):  # hanging inside step 5
        assert job.proc.poll() is None and time.monotonic() < deadline, \
            "the run did not reach step 5"
        time.sleep(0.05)
    job.proc.send_signal(signal.SIGTERM)
    proc = job.finish()
    err = proc.stderr
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and lines == [
        f"error: stopped by SIGTERM at step 4 (the job was cancelled, or another rank failed); "
        f"last good checkpoint: {run / 'checkpoints' / checkpoint_name(3)}; resume with "
        f"--resume"], err[-3000:]
    result = train(load_config(CONFIG, overrides(run)), resume=True)
    assert result.step == STEPS
    assert_identical_runs(reference[0], run)


# Where inside saving or pruning the writer is killed, which checkpoint must then be the newest
# intact one, and what the kill leaves behind. The kill lands in the second save (step 6) or in
# the first prune (of step 3, after step 9's checkpoint was written).
KILL_POINTS = [
    ("save-mid-file:2", 3, ".tmp-step_00000006-"),
    ("save-before-rename:2", 3, ".tmp-step_00000006-"),
    ("save-after-rename:2", 6, None),
    ("prune-mid-delete:1", 9, ".deleting-step_00000003"),
]


@pytest.mark.slow
@pytest.mark.parametrize("fault, survivor, leftover", KILL_POINTS,
                         ids=[f for f, _, _ in KILL_POINTS])
def test_kill9_during_checkpoint_write_keeps_a_loadable_checkpoint(
        fault, survivor, leftover, reference, tmp_path, caplog, restore_threads):
    run = tmp_path / "run"
    killed = run_cli(run, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = run / "checkpoints"
    leftovers = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("."))
    assert [name.startswith(leftover) for name in leftovers] == ([True] if leftover else [])
    # The newest intact checkpoint is the one expected, and it loads; nothing half-written or
    # half-deleted is listed as a checkpoint.
    latest = find_latest_checkpoint(ckpts)
    assert latest == ckpts / checkpoint_name(survivor)
    for path in list_checkpoints(ckpts):
        verify_checkpoint(path)
    ckpt = open_checkpoint(run)
    assert ckpt.path == latest and ckpt.tensors("model") and ckpt.tensors("ema")

    result = train(load_config(CONFIG, overrides(run)), resume=True)
    assert result.step == STEPS
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    for name in leftovers:
        assert f"removing {ckpts / name}, left by an interrupted checkpoint" in caplog.text
    assert_identical_runs(reference[0], run)


def test_bitflipped_newest_checkpoint_is_reported_skipped_and_replaced(
        reference, tmp_path, caplog, restore_threads):
    caplog.set_level(logging.INFO, logger="diffmoe")
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    ckpts = list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == [checkpoint_name(9), checkpoint_name(STEPS)]
    newest = ckpts[-1] / "ema.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    newest.write_bytes(bytes(data))
    # Sampling checks the hash of what it loads.
    with pytest.raises(CheckpointError, match="ema.safetensors fails its SHA-256 check"):
        open_checkpoint(ckpts[-1]).tensors("ema")
    # Resume reports and skips it, replays steps 10-12, and writes an intact step 12 in its
    # place; the damaged one is moved aside, not deleted.
    result = train(load_config(CONFIG, overrides(run)), resume=True)
    assert result.step == STEPS
    assert f"skipping damaged checkpoint: checkpoint '{ckpts[-1]}' is corrupt (ema.safetensors " \
           f"fails its SHA-256 check)" in caplog.text
    assert f"resumed from {ckpts[0]} at step 9" in caplog.text
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("damaged-")]
    assert len(aside) == 1 and (aside[0] / "ema.safetensors").read_bytes() == bytes(data)
    assert_identical_runs(reference[0], run)


# ---------------------------------------------------------------------------------------------
# Non-finite loss, injected by poisoning one batch in-process
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def poison(monkeypatch):
    """poison({3, 4}) makes the batches of those steps NaN."""
    steps: set[int] = set()
    original = BatchIterator.next

    def next_batch(self):
        x, y = original(self)
        step = self.state.epoch * self.batches_per_epoch + self.state.position
        return (x * torch.nan if step in steps else x), y

    monkeypatch.setattr(BatchIterator, "next", next_batch)
    return steps.update


def small(tmp_path, **extra) -> list[str]:
    base = {"train.out_dir": tmp_path / "run", "train.steps": 6, "train.log_every": 2,
            "train.ckpt_every": 2, "train.sample_every": 100, "sample.steps": 1}
    return [f"{k}={v}" for k, v in dict(base, **extra).items()]


def test_nonfinite_loss_stops_naming_step_and_last_good_checkpoint(poison, tmp_path, capsys):
    poison({5})
    rc = main(["train", str(CONFIG), *small(tmp_path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    run = tmp_path / "run"
    assert rc == 2 and lines == [
        f"error: non-finite loss (nan) at step 5; last good checkpoint: {run}/checkpoints/"
        f"step_00000004; resume from it with --resume --accept-changes after lowering train.lr "
        f"or setting train.grad_clip, or with --resume after setting train.nonfinite_loss=skip"
    ], err
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [
        "step_00000002", "step_00000004"]
    assert [r["step"] for r in metric_records(run)] == [2, 4]


def test_nonfinite_loss_skip_leaves_state_untouched_and_counts(poison, tmp_path, caplog):
    poison({3, 4})  # a whole logging interval (steps 3-4) is skipped
    result = train(load_config(CONFIG, small(tmp_path, **{"train.nonfinite_loss": "skip"})))
    assert result.step == 6
    records = metric_records(result.run_dir)
    assert [r["skipped_steps"] for r in records] == [0, 2, 2]
    assert records[1]["loss"] is None and records[1]["diffusion_loss"] is None
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in (records[0], records[2]))
    assert "non-finite loss (nan) at step 3: step skipped (1 skipped so far)" in caplog.text
    assert "2 step(s) of this run were skipped" in caplog.text
    ckpt = open_checkpoint(result.run_dir)
    assert ckpt.state["skipped_steps"] == 2
    # Only 4 optimizer updates happened, and nothing non-finite reached the weights, the EMA or
    # the thresholds (the poisoned forwards' threshold updates were undone).
    optimizer = ckpt.tensors("optimizer")
    assert {float(v) for k, v in optimizer.items() if k.endswith(".step")} == {4.0}
    for name in ("model", "ema"):
        tensors = ckpt.tensors(name)
        assert all(torch.isfinite(v).all() for v in tensors.values()), name
    taus = [v for k, v in ckpt.tensors("model").items() if k.endswith("thresholds_E")]
    assert taus and all(t.abs().sum() > 0 for t in taus)
    # After two poisoned steps, step 2's checkpointed weights equal step 4's: nothing was applied.
    step2 = open_checkpoint(result.run_dir / "checkpoints" / "step_00000002")
    step4 = open_checkpoint(result.run_dir / "checkpoints" / "step_00000004")
    for name in ("model", "ema"):
        a, b = step2.tensors(name), step4.tensors(name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert "skipped_steps" in METRIC_FIELDS


def test_nonfinite_loss_skip_limit_stops_the_run(poison, tmp_path):
    poison(set(range(1, 7)))
    cfg = load_config(CONFIG, small(tmp_path, **{"train.nonfinite_loss": "skip",
                                                 "train.max_skipped_steps": 2}))
    with pytest.raises(TrainingError) as info:
        train(cfg)
    assert str(info.value) == (
        "non-finite loss (nan) at step 3: more than train.max_skipped_steps=2 steps skipped; "
        "last good checkpoint: " + str(tmp_path / "run" / "checkpoints" / "step_00000002") +
        "; check the data, lower train.lr or set train.grad_clip, then resume with --resume "
        "--accept-changes")


# ---------------------------------------------------------------------------------------------
# The run directory: a second writer, an unwritable place, a full disk
# ---------------------------------------------------------------------------------------------

def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_second_training_into_a_run_directory_is_refused_naming_the_holder(
        tmp_path, capsys, caplog, restore_threads):
    """A training stalled inside step 2 holds its run directory: another one into it, new or
    resumed, is refused in one line naming the holder, and changes nothing there. Once the
    holder is SIGKILLed its lock is stale: resume reports it, takes it over and finishes."""
    run, loss_log = tmp_path / "run", tmp_path / "losses.txt"
    env = job_env(DIFFMOE_FAULTS="hang:2", DIFFMOE_LOSS_LOG=str(loss_log))
    job = jobs.Running([sys.executable, str(HERE / "fault_runner.py"), "train", str(CONFIG),
                        *overrides(run)], env, RUN_TIMEOUT_S)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (loss_log.exists() and 2 in losses(loss_log)):
        assert job.proc.poll() is None and time.monotonic() < deadline, "no step 2"
        time.sleep(0.05)
    before = sorted((p, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file())
    holder = rf"pid {job.proc.pid} on {re.escape(socket.gethostname())}, since [-0-9: ]+"
    for extra in ([], ["--resume"]):
        assert main(["train", str(CONFIG), *overrides(run), *extra]) == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and re.fullmatch(
            rf"error: run directory '{re.escape(str(run))}' is in use by another training "
            rf"\({holder}\); wait for it to end or set train.out_dir to another directory",
            lines[0]), lines
    assert before == sorted((p, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file())
    job.proc.kill()
    assert job.finish().returncode == -signal.SIGKILL
    assert (run / "train.lock").is_file()  # left behind by the killed holder
    assert train(load_config(CONFIG, overrides(run)), resume=True).step == STEPS
    assert re.search(rf"run directory '{re.escape(str(run))}': the training that held it "
                     rf"\({holder}\) ended without letting go of it \(it was killed\); "
                     rf"taking it over", caplog.text), caplog.text
    assert not (run / "train.lock").exists()


def test_an_unwritable_out_dir_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    def refuse(self):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self.path))

    monkeypatch.setattr(DirectoryLock, "_open_locked", refuse)
    out = tmp_path / "new" / "run"
    assert main(["train", str(CONFIG), f"train.out_dir={out}"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: train.out_dir '{out}' cannot be written (Permission denied); choose a "
        f"directory you can write to"]
    assert not (tmp_path / "new").exists()  # what the check created is gone again


TMPFS_BYTES = 64 << 20  # room for a few tiny runs


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size, *options)``: a tmpfs of ``size`` bytes mounted at <tmp>/disk (mounted
    again with the new size and options when called again), unmounted at the end. Skips where
    the tests may not mount one (not root, no mount(8), a container without the right)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size: int, *options: str) -> Path:
        opts = ",".join([*(["remount"] if mounted else []), f"size={size}", *options])
        try:
            res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(disk)],
                                 capture_output=True, text=True)
        except OSError as exc:
            res = subprocess.CompletedProcess([], 1, "", str(exc))
        if res.returncode:
            assert not mounted, res.stderr
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
        mounted.append(disk)
        return disk

    yield mount
    if mounted:
        res = subprocess.run(["umount", str(disk)], capture_output=True, text=True)
        if res.returncode:  # something was left open on it: detach it anyway, then fail
            subprocess.run(["umount", "-l", str(disk)], check=True)
            raise AssertionError(f"umount {disk}: {res.stderr}")


def disk_full_line(run: Path, step: int, last: Path) -> str:
    ckpts = run / "checkpoints"
    return (rf"error: no space left on the disk holding '{re.escape(str(ckpts))}' \(mounted at "
            rf"'(?P<mount>[^']+)', [0-9.]+ \w+ free of [0-9.]+ \w+\) while writing the checkpoint "
            rf"of step {step}; it was not written, and the last good checkpoint is "
            rf"{re.escape(str(last))}; free space there \(or lower train.keep_checkpoints\), "
            rf"then resume with --resume")


def assert_only_intact(run: Path, names: list[str]) -> None:
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == names  # no .tmp-* left
    for path in list_checkpoints(ckpts):
        verify_checkpoint(path, check_hashes=True)


def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_names_the_disk(
        tmp_path, monkeypatch, capsys, restore_threads):
    """The second checkpoint's optimizer file, half written, fails as safetensors fails on a
    full disk: the run ends with one line naming the disk; the first checkpoint is intact and
    resumes."""
    original = checkpoint.save_file

    def full(tensors, path):
        if f"{checkpoint_name(4)}-" in path and path.endswith("optimizer.safetensors"):
            Path(path).write_bytes(b"half a file")
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  f"(os error {errno.ENOSPC})")
        return original(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", full)
    run = tmp_path / "run"
    assert main(["train", str(CONFIG), *small(tmp_path)]) == 2
    lines = error_lines(capsys.readouterr().err)
    last = run / "checkpoints" / checkpoint_name(2)
    match = re.fullmatch(disk_full_line(run, 4, last), lines[0]) if len(lines) == 1 else None
    assert match, lines
    mount = Path(match["mount"])
    assert os.path.ismount(mount) and str(tmp_path).startswith(str(mount))
    assert_only_intact(run, [checkpoint_name(2)])
    monkeypatch.setattr(checkpoint, "save_file", original)
    assert train(load_config(CONFIG, small(tmp_path)), resume=True).step == 6


def test_disk_full_on_a_small_tmpfs_keeps_the_last_checkpoint(tmpfs, capsys, restore_threads):
    """The same on a real full disk: a tmpfs with room for half a checkpoint more than the
    run's first one."""
    disk = tmpfs(TMPFS_BYTES)
    run = disk / "run"
    assert main(["train", str(CONFIG), *small(disk, **{"train.steps": 2})]) == 0
    first = run / "checkpoints" / checkpoint_name(2)
    size = sum(p.stat().st_size for p in first.iterdir())
    tmpfs(shutil.disk_usage(disk).used + size // 2)
    assert main(["train", str(CONFIG), *small(disk), "--resume"]) == 2
    lines = error_lines(capsys.readouterr().err)
    match = re.fullmatch(disk_full_line(run, 4, first), lines[0]) if len(lines) == 1 else None
    assert match and match["mount"] == str(disk), lines
    assert_only_intact(run, [checkpoint_name(2)])
    tmpfs(TMPFS_BYTES)
    assert main(["train", str(CONFIG), *small(disk), "--resume"]) == 0
    assert_only_intact(run, [checkpoint_name(2), checkpoint_name(4), checkpoint_name(6)])


def test_a_read_only_out_dir_is_refused_before_any_work(tmpfs, capsys):
    disk = tmpfs(TMPFS_BYTES, "ro")
    assert main(["train", str(CONFIG), f"train.out_dir={disk}/run"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: train.out_dir '{disk}/run' cannot be written (Read-only file system); choose a "
        f"directory you can write to"]
