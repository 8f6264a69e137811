"""Training end to end on scikit-learn digits: outputs, exact resume, checkpoints, samples."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from diffmoe.checkpoint import list_checkpoints
from diffmoe.cli import main
from diffmoe.config import load_config
from diffmoe.errors import CheckpointError, DiffMoEError
from diffmoe.hub import load_pretrained
from diffmoe.train import train


@pytest.mark.parametrize("kind", ["dense", "token_choice", "expert_choice", "diffmoe"])
def test_every_variant_trains_and_writes_its_outputs(kind, tiny_config_path, tiny_overrides):
    cfg = load_config(tiny_config_path, tiny_overrides(f"r_{kind}", **{"model.moe.type": kind}))
    result = train(cfg)
    run = result.run_dir
    assert result.step == 6
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    for r in lines:
        assert all(k in r for k in ("loss", "diffusion_loss", "predictor_bce", "aux_loss",
                                    "threshold_mean", "dynamic_capacity", "images_per_sec"))
    assert (lines[0]["predictor_bce"] > 0) == (kind == "diffmoe")
    assert (lines[0]["aux_loss"] > 0) == (kind == "token_choice")
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "grid_classes.json", "step_00000003.png", "step_00000006.png"]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [
        "step_00000003", "step_00000006"]
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()


def test_training_reduces_loss(tiny_config_path, tiny_overrides):
    cfg = load_config(tiny_config_path, tiny_overrides("learn", **{
        "train.steps": 60, "train.log_every": 20, "train.sample_every": 1000,
        "train.ckpt_every": 1000}))
    run = train(cfg).run_dir
    losses = [json.loads(x)["diffusion_loss"]
              for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]


def test_resume_is_exact(tiny_config_path, tiny_overrides):
    common = {"train.steps": 8, "train.ckpt_every": 4, "train.sample_every": 100,
              "train.keep_checkpoints": 5}
    full = train(load_config(tiny_config_path, tiny_overrides("full", **common)))
    half_cfg = load_config(tiny_config_path, tiny_overrides("half", **dict(common, **{
        "train.steps": 4})))
    train(half_cfg)
    resumed = train(load_config(tiny_config_path, tiny_overrides("half", **common)), resume=True)
    assert resumed.step == 8
    a = full.run_dir / "checkpoints" / "step_00000008"
    b = resumed.run_dir / "checkpoints" / "step_00000008"
    for name in ("model", "ema", "optimizer"):
        ta = load_file(str(a / f"{name}.safetensors"))
        tb = load_file(str(b / f"{name}.safetensors"))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    weights = load_file(str(a / "model.safetensors"))
    thresholds = [k for k in weights if k.endswith("thresholds_E")]
    assert thresholds and all(weights[k].abs().sum() > 0 for k in thresholds)
    la = (full.run_dir / "metrics.jsonl").read_text().splitlines()
    lb = (resumed.run_dir / "metrics.jsonl").read_text().splitlines()

    def key(line):
        return {k: v for k, v in json.loads(line).items()
                if k not in ("images_per_sec", "elapsed_s")}

    assert [key(x) for x in la] == [key(x) for x in lb]


def test_existing_run_is_never_overwritten(tiny_config_path, tiny_overrides):
    cfg = load_config(tiny_config_path, tiny_overrides("keep"))
    run = train(cfg).run_dir
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(DiffMoEError, match="already holds a run; add --resume"):
        train(cfg)
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert before == after


def test_resume_with_other_architecture_is_refused(tiny_config_path, tiny_overrides):
    train(load_config(tiny_config_path, tiny_overrides("arch")))
    other = load_config(tiny_config_path, tiny_overrides("arch", **{
        "model.moe.num_experts": 2, "train.steps": 9}))
    with pytest.raises(CheckpointError, match="model.moe.num_experts"):
        train(other, resume=True)


def test_resume_skips_truncated_newest_checkpoint(tiny_config_path, tiny_overrides, caplog):
    run = train(load_config(tiny_config_path, tiny_overrides("trunc"))).run_dir
    newest = run / "checkpoints" / "step_00000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    resumed = train(load_config(tiny_config_path, tiny_overrides("trunc", **{
        "train.steps": 7})), resume=True)
    assert resumed.step == 7
    assert "skipping damaged checkpoint" in caplog.text and "step_00000006" in caplog.text


def test_sample_cli_writes_grid_and_capacity(tiny_config_path, tiny_overrides, tmp_path, capsys):
    run = train(load_config(tiny_config_path, tiny_overrides("samp"))).run_dir
    out = tmp_path / "grid.png"
    for mode in ("dynamic", "static", "threshold"):
        rc = main(["sample", str(run), "--num", "10", "--steps", "2", "--mode", mode,
                   "--batch-size", "5", "--out", str(out), "--cfg-scale", "2", "--force"])
        assert rc == 0 and out.is_file()
        summary = json.loads(out.with_suffix(".json").read_text())
        assert summary["settings"]["mode"] == mode
        if mode == "static":
            assert summary["c_avg_infer"] == pytest.approx(1.0)
        assert summary["activated_params"] > 0
    loaded = load_pretrained(run)
    assert loaded.step == 6 and loaded.source.name == "step_00000006"


def test_checkpoints_are_pruned(tiny_config_path, tiny_overrides):
    run = train(load_config(tiny_config_path, tiny_overrides("prune", **{
        "train.ckpt_every": 1, "train.keep_checkpoints": 2}))).run_dir
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [
        "step_00000005", "step_00000006"]


def test_time_limit_stops_with_checkpoint_and_metrics(tiny_config_path, tiny_overrides):
    run = train(load_config(tiny_config_path, tiny_overrides("limit", **{
        "train.steps": 1000, "train.max_minutes": 1e-6}))).run_dir
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000001"]
    assert (run / "samples" / "step_00000001.png").is_file()


# The fixture's machine (AVX2) and one with AVX-512 run MKL kernels that round differently: the
# same code reaches step 6 within 2e-6 (relative) of the fixture's weights there. A resume that
# lost state (RNG, optimizer moments, EMA, thresholds) moves them by about the learning rate.
CROSS_CPU_RTOL, CROSS_CPU_ATOL = 2e-5, 1e-6


def test_checkpoint_written_before_the_redesign_resumes_to_the_old_codes_step(tmp_path):
    """A run directory written by the code before issue 17's redesign (commit ec998bd, see
    tests/fixtures/run_ec998bd/README.md) resumes with today's code from its step-4 checkpoint
    and reaches the old code's step-6 weights and metrics: bit for bit on a CPU like the one that
    wrote it, within float rounding (``CROSS_CPU_RTOL``) on another."""
    import shutil
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "run_ec998bd"
    run = tmp_path / "run"
    shutil.copytree(fixture, run, ignore=shutil.ignore_patterns("expected_*", "*.py", "*.md"))
    result = train(load_config(run / "config.yaml", [f"train.out_dir={run}"]), resume=True)
    assert result.step == 6
    for name in ("model", "ema"):
        expected = load_file(fixture / "expected_step_00000006" / f"{name}.safetensors")
        got = load_file(run / "checkpoints" / "step_00000006" / f"{name}.safetensors")
        assert expected.keys() == got.keys()
        for k in expected:
            assert_close(got[k], expected[k], rtol=CROSS_CPU_RTOL, atol=CROSS_CPU_ATOL,
                         msg=lambda m, k=k, name=name: f"{name} {k}: {m}")
    # threshold_mean is, since the redesign, tau as the step's forward saw it (the old code logged
    # it after the step's update); timings differ from run to run.
    differ = ("images_per_sec", "elapsed_s", "threshold_mean")
    old, new = ([{k: v for k, v in json.loads(line).items() if k not in differ}
                 for line in path.read_text().splitlines()]
                for path in (fixture / "metrics.jsonl", run / "metrics.jsonl"))
    assert len(new) == len(old)
    for got, expected in zip(new, old):
        assert got == pytest.approx(expected, rel=CROSS_CPU_RTOL, abs=CROSS_CPU_ATOL)
    model = load_pretrained(run / "checkpoints" / "step_00000004").model
    assert model.cfg.hidden_size == 16


HOST_DATA_MODULES = ("loader.py", "datasets.py")  # index the dataset on the host by design


@pytest.mark.parametrize("kind", ["diffmoe", "token_choice", "expert_choice", "dense"])
def test_a_steady_training_step_never_waits_for_the_device(kind, tiny_config_path, tmp_path):
    """The host-sync budget of docs/performance.md: no host synchronisation in a training step
    (gradient accumulation and clipping on; tests/host_syncs.py counts them on the CPU), and
    one read when the trainer settles which steps were kept, before logging, sampling or
    saving."""
    from host_syncs import HostSyncCounter

    from diffmoe.train import Trainer

    cfg = load_config(tiny_config_path, [f"train.out_dir={tmp_path / 'run'}",
                                         f"model.moe.type={kind}", "train.grad_accum=2",
                                         "train.grad_clip=1.0"])
    trainer = Trainer(cfg)
    try:
        trainer.train_step()  # the first step creates the optimizer state
        with HostSyncCounter(same_device_copies=False) as syncs:
            for _ in range(3):
                trainer.train_step()
        events = [(e.kind, e.where) for e in syncs.events
                  if not e.where.startswith(HOST_DATA_MODULES)]
        if kind == "token_choice":
            # Its experts take unequal counts, so the padded kernel reads the largest one:
            # one read per MoE layer and micro-batch (none where grouped_mm runs, on CUDA).
            assert len(events) == 3 * 2 and all("run_grouped" in where for _, where in events)
        else:
            assert events == []
        with HostSyncCounter() as syncs:
            trainer.settle()
        assert [(e.kind, e.where.split(":")[0]) for e in syncs.events] == [
            ("tolist", "train.py")]
    finally:
        trainer.close()


def test_bf16_gradient_all_reduce_is_refused_without_cuda(tiny_config_path, tmp_path):
    from diffmoe.errors import ConfigError

    cfg = load_config(tiny_config_path, [f"train.out_dir={tmp_path / 'run'}", "train.device=cpu",
                                         "train.ddp_bf16_grads=true"])
    with pytest.raises(ConfigError, match="train.ddp_bf16_grads=true needs CUDA"):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.cuda
def test_a_steady_training_step_never_synchronises_on_cuda(tiny_config_path, tmp_path):
    """The same budget, checked by CUDA itself: its sync debug mode raises at any host
    synchronisation during three steady training steps."""
    from diffmoe.train import Trainer

    cfg = load_config(tiny_config_path, [f"train.out_dir={tmp_path / 'run'}", "train.device=cuda",
                                         "train.grad_accum=2", "train.grad_clip=1.0"])
    trainer = Trainer(cfg)
    try:
        trainer.train_step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        trainer.settle()
    finally:
        trainer.close()


def test_every_config_key_has_a_resume_class():
    """Each key declares its resume class with its field (config/schema.py); the table the resume
    rule reads has every key of the schema, each with its class (a field without a declaration
    is refused: tests/test_config_keys.py)."""
    from diffmoe.config import Config
    from diffmoe.config.keys import RESUME_CLASSES, flatten
    from diffmoe.config.resume import KEY_CLASS

    assert list(KEY_CLASS) == list(flatten(Config().to_dict()))
    assert set(KEY_CLASS.values()) == set(RESUME_CLASSES)
    assert KEY_CLASS["objective.type"] == "objective" and KEY_CLASS["train.lr"] == "optimisation"
    assert KEY_CLASS["train.steps"] == "bookkeeping" and KEY_CLASS["data.split"] == "data"
    assert KEY_CLASS["model.moe.dispatch"] == "bookkeeping" and KEY_CLASS["train.seed"] == "data"


def history(run):
    return sorted(p.name for p in (run / "config_history").iterdir())


def test_resume_with_other_optimisation_needs_accept_changes_and_records_each_config(
        tiny_config_path, tiny_overrides, capsys):
    run = train(load_config(tiny_config_path, tiny_overrides("opt", **{
        "train.steps": 4, "train.ckpt_every": 2}))).run_dir
    first = (run / "config.yaml").read_text()
    changed = tiny_overrides("opt", **{"train.steps": 6, "train.ckpt_every": 2,
                                       "train.weight_decay": 0.5})
    argv = ["train", str(tiny_config_path), *changed, "--resume"]
    assert main(argv) == 2
    assert "train.weight_decay (0.0 in the checkpoint, 0.5 now); add --accept-changes" in \
        capsys.readouterr().err
    assert not (run / "config_history").exists() and (run / "config.yaml").read_text() == first
    assert main(argv + ["--accept-changes"]) == 0
    assert history(run) == ["step_00000000.yaml", "step_00000004.yaml"]
    assert (run / "config_history" / "step_00000000.yaml").read_text() == (
        "# the config of this run from step 0 on\n" + first)
    accepted = run / "config_history" / "step_00000004.yaml"
    assert accepted.read_text().splitlines()[0] == (
        "# the config of this run from step 4 on; changed then: train.steps (4 in the checkpoint,"
        " 6 now); train.weight_decay (0.0 in the checkpoint, 0.5 now)")
    assert load_config(accepted).train.weight_decay == 0.5
    assert (run / "config.yaml").read_text() == load_config(tiny_config_path, changed).to_yaml()
    # The optimizer trained on with the new setting, not the checkpoint's.
    for step, decay in ((4, 0.0), (6, 0.5)):
        state = json.loads((run / "checkpoints" / f"step_{step:08d}" / "state.json").read_text())
        assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {decay}
    # A run killed after the accepted change, before its next checkpoint, resumes from step 4
    # under the accepted config without being asked again; the old setting is now a change.
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    assert main(["train", str(run / "config.yaml"), "--resume"]) == 0
    assert history(run) == ["step_00000000.yaml", "step_00000004.yaml"]
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    assert main(["train", str(tiny_config_path), *tiny_overrides("opt", **{
        "train.steps": 6, "train.ckpt_every": 2}), "--resume"]) == 2
    assert "train.weight_decay (0.5 in the checkpoint, 0.0 now)" in capsys.readouterr().err


def test_resume_with_bookkeeping_changes_records_them(tiny_config_path, tiny_overrides):
    run = train(load_config(tiny_config_path, tiny_overrides("book", **{
        "train.steps": 3}))).run_dir
    train(load_config(tiny_config_path, tiny_overrides("book", **{
        "train.steps": 5, "train.log_every": 1, "sample.num": 4})), resume=True)
    assert history(run) == ["step_00000000.yaml", "step_00000003.yaml"]
    header = (run / "config_history" / "step_00000003.yaml").read_text().splitlines()[0]
    assert "train.steps (3 in the checkpoint, 5 now)" in header
    assert "train.log_every (2 in the checkpoint, 1 now)" in header
    assert "sample.num (10 in the checkpoint, 4 now)" in header


def test_resume_without_checkpoints_keeps_the_earlier_history(tiny_config_path, tiny_overrides,
                                                              caplog):
    """The checkpoints are gone: --resume starts again from step 0 and moves what the earlier
    attempt wrote (with a user's own line) to previous-<time>/, byte for byte."""
    cfg = load_config(tiny_config_path, tiny_overrides("gone"))
    run = train(cfg).run_dir
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write("my note: the loss looked fine\n")
    metrics = (run / "metrics.jsonl").read_bytes()
    grids = {p.name: p.read_bytes() for p in (run / "samples").iterdir()}
    shutil.rmtree(run / "checkpoints")
    argv = ["train", str(tiny_config_path), *tiny_overrides("gone"), "--resume"]
    assert main(argv) == 0
    previous = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1
    assert (previous[0] / "metrics.jsonl").read_bytes() == metrics
    assert {p.name: p.read_bytes() for p in (previous[0] / "samples").iterdir()} == grids
    assert not (previous[0] / "config.yaml").exists()  # the same config: nothing to keep
    said = f"starting it again from step 0; what the earlier attempt wrote (metrics.jsonl and " \
           f"samples/) is kept in '{previous[0]}'"
    assert said in caplog.text and said in (run / "train.log").read_text()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        2, 4, 6]


def test_rewind_keeps_lines_that_are_no_metric_record(tiny_config_path, tiny_overrides):
    run = train(load_config(tiny_config_path, tiny_overrides("rewind"))).run_dir
    records = (run / "metrics.jsonl").read_text().splitlines()
    foreign = ["# my note", '{"comment": "no step"}', "\xff not utf-8"]
    (run / "metrics.jsonl").write_bytes("\n".join(
        [records[0], foreign[0], records[1], foreign[1], records[2], foreign[2]]).encode(
            "utf-8", "surrogateescape") + b"\n")
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    train(load_config(tiny_config_path, tiny_overrides("rewind")), resume=True)
    assert (run / "metrics.set-aside.txt").read_bytes() == "".join(
        line + "\n" for line in foreign).encode("utf-8", "surrogateescape")
    key = ("images_per_sec", "elapsed_s")
    assert [{k: v for k, v in json.loads(x).items() if k not in key} for x in records] == [
        {k: v for k, v in json.loads(x).items() if k not in key}
        for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_start_refused_after_its_checks_leaves_nothing_behind(tiny_config_path, tmp_path):
    """Nothing is written before every check passed: a data error (found while building)
    leaves no run directory, and a user's config.yaml in train.out_dir stays as it was."""
    out = tmp_path / "new" / "run"
    with pytest.raises(DiffMoEError, match="no split 'valid'"):
        train(load_config(tiny_config_path, [f"train.out_dir={out}", "data.split=valid"]))
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    with pytest.raises(DiffMoEError, match="already holds config.yaml, which a new run writes"):
        train(load_config(tiny_config_path, [f"train.out_dir={mine}"]))
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml"]
    assert (mine / "config.yaml").read_text() == "my: settings\n"
