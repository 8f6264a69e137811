"""``diffmoe plan`` (diffmoe/plan.py): the simulated training step's peak memory against the same
step run for real on the CPU and measured with the same tracker (one process, and DDP and FSDP2
with 2 gloo ranks, for a DiffMoE and a dense model); its FLOPs against torch's count of the real
step; its advice; and its refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from jobs import run, torchrun

from diffmoe.cli import main as cli_main
from diffmoe.config import load_config
from diffmoe.plan import GIB, plan, simulate_training

HERE = Path(__file__).parent
TIMEOUT_S = 240
PEAK_TOLERANCE = 0.10  # the bound on simulated against measured peak
# Small enough to run for real in a second, large enough that both the states and the
# activations weigh (about 12 MB of parameters, 60 MB of activations per rank).
MODEL = ["model.input_size=16", "model.in_channels=4", "train.batch_size=32", "train.seed=0"]
DIFFMOE = ["model.preset=DiffMoE-Tiny-E8", *MODEL]
DENSE = ["model.preset=Dense-DiT-Tiny", *MODEL]
SINGLE_CASES = [DIFFMOE, DENSE,
                [*DIFFMOE, "train.activation_checkpointing=true", "train.precision=bf16",
                 "train.grad_accum=2"]]
DISTRIBUTED_CASES = [[*DIFFMOE, "train.parallel=ddp"], [*DENSE, "train.parallel=ddp"],
                     [*DIFFMOE, "train.parallel=fsdp"], [*DENSE, "train.parallel=fsdp"],
                     [*DIFFMOE, "train.parallel=fsdp", "train.precision=bf16",
                      "train.activation_checkpointing=true"]]


def measured(tmp_path: Path, cases: list[list[str]], ranks: int) -> list[dict]:
    result = tmp_path / f"measured{ranks}.json"
    args = [str(HERE / "plan_check.py"), str(result), json.dumps(cases)]
    job = (run([sys.executable, *args], TIMEOUT_S) if ranks == 1
           else torchrun(args, TIMEOUT_S, nproc=ranks))
    assert job.returncode == 0, job.stderr[-3000:]
    return json.loads(result.read_text())["cases"]


def check_against_simulation(cases: list[dict], ranks: int) -> None:
    for case in cases:
        memory, flops, _ = simulate_training(load_config(None, case["overrides"]), ranks)
        real = case["memory"]
        assert memory["total"] == pytest.approx(real["total"], rel=PEAK_TOLERANCE), \
            (case["overrides"], memory, real)
        # The parameter states are the same tensors, so the same bytes.
        for key in ("parameters", "ema", "optimizer"):
            assert memory[key] == real[key], (case["overrides"], key)
        assert flops == case["flops"], case["overrides"]  # the same products of the same shapes


def test_simulated_peak_matches_a_real_single_process_step(tmp_path):
    check_against_simulation(measured(tmp_path, SINGLE_CASES, 1), 1)


@pytest.mark.slow
def test_simulated_peak_matches_real_ddp_and_fsdp_steps_on_two_ranks(tmp_path):
    check_against_simulation(measured(tmp_path, DISTRIBUTED_CASES, 2), 2)
