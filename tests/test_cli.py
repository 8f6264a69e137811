"""Bad input through the command line: one clear line, exit status 2, nothing overwritten."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import ROOT

from diffmoe.cli import main
from diffmoe.config import load_config


def run_cli(argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def trained_run(train_tiny):
    return train_tiny()


@pytest.mark.parametrize("overrides, fragment", [
    (["model.moe.num_expert=8"], "unknown config key 'model.moe.num_expert'"),
    (["model.moe.num_experts=0"], "model.moe.num_experts=0 must be a positive integer"),
    (["model.moe.capacity=-0.5"], "model.moe.capacity=-0.5 must be positive"),
    (["model.patch_size=3"], "model.input_size=8 is not divisible by model.patch_size=3"),
    (["model.input_size=16"], "set model.input_size=8"),
])
def test_train_config_errors(overrides, fragment, capsys, tiny_config_path, tmp_path):
    rc, _, err = run_cli(["train", str(tiny_config_path), f"train.out_dir={tmp_path / 'x'}"]
                         + overrides, capsys)
    assert rc == 2 and fragment in error_line(err)


def test_dry_run_prints_resolved_config(capsys, tiny_config_path):
    rc, out, _ = run_cli(["train", str(tiny_config_path), "--dry-run",
                          "model.moe.num_experts=8"], capsys)
    assert rc == 0
    resolved = yaml.safe_load(out)
    assert resolved["model"]["moe"]["num_experts"] == 8
    assert resolved["train"]["lr"] == 1e-3


def test_missing_config_file(capsys, tmp_path):
    rc, _, err = run_cli(["train", str(tmp_path / "nope.yaml")], capsys)
    assert rc == 2 and "does not exist" in error_line(err)


def test_missing_checkpoint(capsys, tmp_path):
    rc, _, err = run_cli(["sample", str(tmp_path / "nothing")], capsys)
    assert rc == 2 and "does not exist" in error_line(err)
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(["sample", str(tmp_path / "empty")], capsys)
    assert rc == 2 and "neither a checkpoint nor a run directory" in error_line(err)


def test_corrupt_checkpoint(capsys, trained_run, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(trained_run / "checkpoints" / "step_00000002", bad)
    weights = bad / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    rc, _, err = run_cli(["sample", str(bad), "--out", str(tmp_path / "o.png")], capsys)
    assert rc == 2 and "is corrupt (ema.safetensors has" in error_line(err)
    (bad / "state.json").write_text("{not json")
    rc, _, err = run_cli(["sample", str(bad)], capsys)
    assert rc == 2 and "state.json is unreadable" in error_line(err)


def test_checkpoint_from_another_architecture(capsys, trained_run, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(trained_run / "checkpoints" / "step_00000002", other)
    state = json.loads((other / "state.json").read_text())
    state["config"]["model"]["moe"]["num_experts"] = 2
    (other / "state.json").write_text(json.dumps(state))
    rc, _, err = run_cli(["sample", str(other), "--out", str(tmp_path / "o.png")], capsys)
    line = error_line(err)
    assert rc == 2 and "does not match the model architecture" in line and "shape of" in line


def test_sample_argument_errors(capsys, trained_run, tmp_path):
    out = str(tmp_path / "o.png")
    rc, _, err = run_cli(["sample", str(trained_run), "--steps", "0", "--out", out], capsys)
    assert rc == 2 and "sample.steps=0 must be a positive integer" in error_line(err)
    rc, _, err = run_cli(["sample", str(trained_run), "--labels", "3,99", "--out", out], capsys)
    assert rc == 2 and "class 99 is outside 0..9" in error_line(err)
    rc, _, err = run_cli(["sample", str(trained_run), "--mode", "threshold", "--threshold", "2",
                          "--out", out], capsys)
    assert rc == 2 and "must be in [0, 1]" in error_line(err)


def test_dynamic_mode_needs_a_predictor(capsys, train_tiny, tmp_path):
    run = train_tiny("model.moe.type=dense")
    rc, _, err = run_cli(["sample", str(run), "--mode", "dynamic", "--out",
                          str(tmp_path / "o.png")], capsys)
    assert rc == 2 and "needs a capacity predictor" in error_line(err)


def test_existing_sample_output_is_not_replaced(capsys, trained_run, tmp_path):
    out = tmp_path / "mine.png"
    out.write_bytes(b"precious")
    rc, _, err = run_cli(["sample", str(trained_run), "--out", str(out)], capsys)
    assert rc == 2 and "already exists; pass --force" in error_line(err)
    assert out.read_bytes() == b"precious"


def test_existing_run_refused_by_cli(capsys, trained_run):
    before = sorted(p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file())
    rc, _, err = run_cli(["train", str(ROOT / "configs" / "digits_tiny.yaml"),
                          f"train.out_dir={trained_run}"], capsys)
    assert rc == 2 and "already holds a run; add --resume" in error_line(err)
    assert before == sorted(p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def ddpm_run(train_tiny):
    run = train_tiny("objective.type=ddpm", "model.learn_sigma=true", "sample.steps=3")
    assert load_config(run / "config.yaml").sample.sampler == "auto"
    return run


@pytest.mark.parametrize("sampler, extra", [("ddpm", []), ("ddim", ["--ddim-eta", "0.5"]),
                                            (None, ["--guidance-channels", "1"])])
def test_ddpm_checkpoint_samples_with_its_samplers(ddpm_run, sampler, extra, capsys, tmp_path):
    out = tmp_path / "grid.png"
    argv = ["sample", str(ddpm_run), "--num", "4", "--steps", "3", "--cfg-scale", "2",
            "--out", str(out)] + (["--sampler", sampler] if sampler else []) + extra
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["settings"]["sampler"] == (sampler or "ddpm")  # auto resolved
    assert summary["c_avg_infer"] > 0
    assert (ddpm_run / "samples" / "step_00000002.png").exists()


@pytest.mark.parametrize("sampler", ["dopri5", "sde"])
def test_flow_checkpoint_samples_with_the_new_samplers(trained_run, sampler, capsys, tmp_path):
    out = tmp_path / "grid.png"
    rc, _, err = run_cli(["sample", str(trained_run), "--num", "4", "--steps", "2",
                          "--sampler", sampler, "--out", str(out)], capsys)
    assert rc == 0, err
    assert json.loads(out.with_suffix(".json").read_text())["c_avg_infer"] > 0


def test_ddpm_checkpoint_refuses_flow_samplers(ddpm_run, capsys, tmp_path):
    rc, _, err = run_cli(["sample", str(ddpm_run), "--sampler", "heun",
                          "--out", str(tmp_path / "g.png")], capsys)
    assert rc == 2
    assert "not available for objective.type=ddpm" in error_line(err)


def test_sample_in_bf16_records_the_precision(capsys, trained_run, tmp_path):
    out = tmp_path / "bf16.png"
    rc, _, err = run_cli(["sample", str(trained_run), "--precision", "bf16", "--no-tf32",
                          "--num", "2", "--batch-size", "2", "--out", str(out)], capsys)
    assert rc == 0, err
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert settings["precision"] == "bf16" and settings["tf32"] is False
    assert settings["compile"] is False  # not asked for: the checkpoint's own setting


def test_one_gpu_per_process_launchers_use_the_only_visible_gpu():
    from diffmoe.distributed import cuda_index
    from diffmoe.errors import DiffMoEError

    assert cuda_index(local_rank=3, visible=1) == 0  # CUDA_VISIBLE_DEVICES set per rank
    assert cuda_index(local_rank=3, visible=8) == 3  # every GPU of the node visible
    with pytest.raises(DiffMoEError, match="local rank 3 has no GPU: 2 are visible"):
        cuda_index(local_rank=3, visible=2)
