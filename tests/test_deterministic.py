"""``train.deterministic`` (issue 31, item 6): deterministic kernels for bit-for-bit resume on CUDA.

On the CPU: the option turns torch's switch on for the run (and each test here puts it back, so
that it does not leak into other tests), trains, and leaves the environment alone. The cuBLAS
workspace rule is checked on its own, on a mapping standing for the environment. The resume on
CUDA itself is a ``cuda`` test (benchmarks/gpu_check runs those)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jobs
import pytest
import torch
from safetensors.torch import load_file

from diffmoe import device as device_module
from diffmoe.checkpoint import checkpoint_name
from diffmoe.config import load_config
from diffmoe.device import CUBLAS_CONFIG_VAR, use_deterministic
from diffmoe.errors import ConfigError
from diffmoe.train import training_device

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "digits_tiny.yaml"
CUDA_RUN_TIMEOUT_S = 300


@pytest.fixture
def restore_determinism(monkeypatch):
    """Puts torch's process-wide switch back as it was, and keeps CUBLAS_WORKSPACE_CONFIG unset
    for the test (restored after it)."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.delenv(CUBLAS_CONFIG_VAR, raising=False)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def losses(run: Path) -> list[str]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [float(r["loss"]).hex() for r in records]


def test_deterministic_training_on_the_cpu(restore_determinism, train_tiny):
    assert not torch.are_deterministic_algorithms_enabled()  # the suite's default
    plain = train_tiny("train.log_every=1")
    assert not torch.are_deterministic_algorithms_enabled()  # false leaves the switch alone
    deterministic = train_tiny("train.log_every=1", "train.deterministic=true")
    assert torch.are_deterministic_algorithms_enabled()
    assert CUBLAS_CONFIG_VAR not in os.environ  # nothing to set for the CPU
    # No kernel of the tiny run on the CPU has another variant under the switch (index_add_,
    # index_select's backward and the selection's scatter already run serially there), so it is
    # the same computation: the same bits. (Reading uninitialised memory would show here too:
    # the switch fills new tensors with NaN.)
    assert losses(deterministic) == losses(plain)
    assert len(losses(plain)) == 2


def test_false_leaves_a_switch_turned_on_elsewhere_on(restore_determinism):
    torch.use_deterministic_algorithms(True)
    training_device(load_config(TINY, ["train.device=cpu"]).train)
    assert torch.are_deterministic_algorithms_enabled()


def cublas_rule(environ: dict, cuda_initialised: bool = False) -> dict:
    device_module._deterministic_cublas(environ, cuda_initialised, "train.deterministic")
    return environ


def test_cublas_workspace_is_set_before_cuda_starts():
    assert cublas_rule({}) == {CUBLAS_CONFIG_VAR: ":4096:8"}
    for accepted in (":4096:8", ":16:8"):  # the two settings NVIDIA documents, left as they are
        for initialised in (False, True):
            assert cublas_rule({CUBLAS_CONFIG_VAR: accepted}, initialised) == {
                CUBLAS_CONFIG_VAR: accepted}


def test_cublas_workspace_set_otherwise_or_too_late_is_refused():
    with pytest.raises(ConfigError) as err:
        cublas_rule({CUBLAS_CONFIG_VAR: ":4096:2:16:8"})
    assert str(err.value) == (
        "train.deterministic=true needs CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8), but the "
        "environment sets it to ':4096:2:16:8'; unset it or set it to :4096:8")
    environ: dict = {}
    with pytest.raises(ConfigError) as err:
        cublas_rule(environ, cuda_initialised=True)
    assert str(err.value) == (
        "train.deterministic=true needs CUBLAS_WORKSPACE_CONFIG=:4096:8 before cuBLAS is first "
        "used, and CUDA is already initialised in this process; set "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before starting it")
    assert environ == {}


def test_on_cuda_the_process_environment_gets_the_workspace(restore_determinism, monkeypatch):
    """The CUDA branch of :func:`use_deterministic`, wired to the real environment (CUDA itself
    is not needed to set the variable)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    use_deterministic(torch.device("cuda"))
    assert os.environ[CUBLAS_CONFIG_VAR] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled()


def train_cli(run: Path, steps: int, *extra: str) -> None:
    """``diffmoe train`` of digits_tiny on CUDA with train.deterministic=true in a fresh process
    (cuBLAS must not have been used before the option sets its workspace)."""
    env = jobs.job_env()
    env.pop(CUBLAS_CONFIG_VAR, None)
    proc = jobs.run([sys.executable, "-m", "diffmoe", "train", str(TINY),
                     f"train.out_dir={run}", f"train.steps={steps}", "train.ckpt_every=2",
                     "train.log_every=1", "train.sample_every=2", "sample.steps=1",
                     "sample.num=4", "sample.batch_size=4", "train.device=cuda",
                     "train.deterministic=true", *extra], CUDA_RUN_TIMEOUT_S, env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.cuda
def test_deterministic_resume_on_cuda_is_bitwise(tmp_path):
    """4 steps straight against 2 steps, then --resume to 4: the same weights, EMA and optimizer
    state, bit for bit (the same computation, given deterministic kernels)."""
    train_cli(tmp_path / "straight", 4)
    train_cli(tmp_path / "resumed", 2)
    train_cli(tmp_path / "resumed", 4, "--resume")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a, b = (tmp_path / name / "checkpoints" / checkpoint_name(4) for name in ("straight",
                                                                              "resumed"))
    for name in ("model", "ema", "optimizer"):
        ta, tb = (load_file(str(p / f"{name}.safetensors")) for p in (a, b))
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}.{key}"
