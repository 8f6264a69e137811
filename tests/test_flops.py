"""benchmarks/flops.py's model-FLOP formula against torch's FLOP counter on real forwards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffmoe.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from flops import forward_flops_per_image, model_config, training_flops_per_image  # noqa: E402

BATCH = 2
RELATIVE_TOLERANCE = 0.01


@pytest.mark.parametrize("preset", ["Dense-DiT-Mini", "DiffMoE-Mini-E16", "EC-DiT-Mini-E8"])
def test_forward_flops_match_the_counted_products(preset):
    """torch's counter sees every matrix product of a training-mode forward (the DiffMoE and
    expert-choice experts run as batched products at capacity C) except the CPU's fused
    attention kernel, which it does not count: the formula without attention's scores must
    agree with it."""
    m = model_config(preset)
    torch.manual_seed(0)
    model = build_model(m).train()
    x = torch.randn(BATCH, m.in_channels, m.input_size, m.input_size)
    t, y = torch.rand(BATCH) * 1000, torch.randint(0, m.num_classes, (BATCH,))
    with FlopCounterMode(display=False) as counter:
        model(x, t, y)
    parts = forward_flops_per_image(m)
    expected = sum(parts.values()) - parts["attention_scores"]
    assert counter.get_total_flops() / BATCH == pytest.approx(expected, rel=RELATIVE_TOLERANCE)


def test_diffmoe_at_capacity_one_costs_about_the_dense_model():
    """Activated compute: DiffMoE-B-E16 at C = 1 does the dense FFN's work in its MoE layers,
    plus its router and capacity predictor (a few per cent); at C = 2 those layers cost twice."""
    dense = training_flops_per_image(model_config("Dense-DiT-B"))
    moe = model_config("DiffMoE-B-E16")
    assert 1.0 < training_flops_per_image(moe) / dense < 1.05
    assert training_flops_per_image(moe, capacity=2.0) > 1.3 * dense


def run_gpu_check(*args: str, tmp_path: Path):
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    return subprocess.run([sys.executable, str(script), "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_check_refuses_without_cuda(tmp_path):
    proc = run_gpu_check(tmp_path=tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"gpu_check: no CUDA device (torch {torch.__version__}); run it on a GPU machine, or pass "
        f"--cpu-smoke"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_a_cpu(tmp_path):
    """--cpu-smoke: the training, sampling and reporting code of the GPU check, tiny, on a CPU,
    so that a short GPU loan is not spent finding its bugs."""
    proc = run_gpu_check("--cpu-smoke", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {(r["model"], r["precision"]) for r in result["training"]} == {
        (m, p) for m in ("Dense-DiT-Tiny", "DiffMoE-Tiny-E4") for p in ("bf16", "fp32")}
    assert all(r["images_per_s"] > 0 and r["train_GFLOP_per_image"] > 0
               for r in result["training"])
    assert [r["mode"] for r in result["sampling"]] == ["dynamic", "static", "dense"]
    (plan,) = result["plan"]  # the plan's peak against the tracker on the device's real step
    assert plan["model"] == "DiffMoE-Tiny-E4"
    assert plan["plan_GiB"] == pytest.approx(plan["tracked_on_device_GiB"], rel=0.1)
    assert (tmp_path / "gpu_check.txt").read_text().startswith("model")
