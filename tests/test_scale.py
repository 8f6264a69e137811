"""Scale-out training: a cross-rank DiffMoE pool against one process, DDP and FSDP2 runs of the
MNIST demo config under 2-process torchrun (gloo, CPU), and in-process checks of activation
checkpointing and gradient accumulation."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import jobs
import pytest
import torch
from jobs import Job

from diffmoe.checkpoint import checkpoint_name, open_checkpoint
from diffmoe.config import load_config
from diffmoe.models import build_model
from diffmoe.models.moe import apply_threshold_updates, diffmoe_layers

HERE = Path(__file__).parent
ROOT = HERE.parent
TIMEOUT_S = 300
BF16_STEP_REL = 2 ** -7  # two steps of bf16's 8-bit significand, relative
STEPS = 2
MNIST_RUN = {"train.steps": STEPS, "train.batch_size": 8, "data.limit": 64,
             "train.ckpt_every": STEPS, "train.log_every": 1, "train.sample_every": STEPS,
             "sample.steps": 1, "sample.num": 4, "sample.batch_size": 4,
             "train.grad_accum": 2, "train.activation_checkpointing": "true"}


def torchrun(*args: str) -> Job:
    """tests/scale_check.py under 2-process torchrun (tests/jobs.py: fails with the ranks'
    stacks rather than hang)."""
    return jobs.torchrun([str(HERE / "scale_check.py"), *args], TIMEOUT_S)


@pytest.mark.numerics
@pytest.mark.slow
def test_cross_rank_pool_matches_one_process_on_the_global_batch(tmp_path):
    proc = torchrun("pool", str(ROOT / "configs" / "digits_tiny.yaml"), str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["out_max"] > 0.1 and r["grad_max"] > 1e-3 and r["tau_sum"] > 0
    assert r["out_max_diff"] < 1e-5 and r["grad_max_diff"] < 1e-5 and r["tau_max_diff"] < 1e-6
    # The control: each rank pooling its own half gives other selections, other outputs.
    assert r["per_rank_pool_out_max_diff"] > 1e-3


def run_mnist(tmp_path: Path, parallel: str, what: str = "train", run: Path | None = None,
              **extra) -> tuple[dict, Path]:
    run = run or tmp_path / parallel
    overrides = {**MNIST_RUN, "train.out_dir": run, "train.parallel": parallel, **extra}
    report = tmp_path / f"{parallel}-{what}.json"
    proc = torchrun(what, str(ROOT / "configs" / "mnist_diffmoe.yaml"), str(report),
                    *[f"{k}={v}" for k, v in overrides.items()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text()), run


@pytest.mark.slow
def test_mnist_demo_config_under_ddp_and_fsdp2_gives_the_same_weights(tmp_path):
    ddp, ddp_run = run_mnist(tmp_path, "ddp")
    fsdp, fsdp_run = run_mnist(tmp_path, "fsdp")
    assert not ddp["fsdp"] and fsdp["fsdp"] and fsdp["sharded"] > 0
    for report in (ddp, fsdp):  # replicated tensors (thresholds included) agree across ranks
        assert report["step"] == STEPS
        for rank in report["ranks"]:
            assert rank and all(rank.values()), rank
    # Both engines write sharded checkpoints of one layout (tensors by parameter name), with
    # (nearly) the same numbers.
    a, b = (open_checkpoint(r / "checkpoints" / checkpoint_name(STEPS))
            for r in (ddp_run, fsdp_run))
    assert a.sharded and b.sharded
    for name in ("model", "ema", "optimizer"):
        ta, tb = a.tensors(name), b.tensors(name)
        assert ta.keys() == tb.keys(), name
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-5, msg=f"{name}.{k}")
    assert (fsdp_run / "samples" / f"step_{STEPS:08d}.png").is_file()
    # The DDP run's checkpoint resumes under FSDP2 (each rank reading its shards, AdamW state
    # included) and under DDP, one more step each: the two continuations agree.
    for parallel, run in (("fsdp", tmp_path / "ddp-then-fsdp"), ("ddp", tmp_path / "ddp-more")):
        shutil.copytree(ddp_run, run)
        report, _ = run_mnist(tmp_path, parallel, "resume", run, **{"train.steps": STEPS + 1})
        assert report["step"] == STEPS + 1
    a, b = (open_checkpoint(r / "checkpoints" / checkpoint_name(STEPS + 1))
            for r in (tmp_path / "ddp-more", tmp_path / "ddp-then-fsdp"))
    for name in ("model", "ema", "optimizer"):
        ta, tb = a.tensors(name), b.tensors(name)
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-5, msg=f"{name}.{k}")


@pytest.mark.slow
@pytest.mark.parametrize("parallel, extra", [
    ("ddp", {}),
    ("fsdp", {"train.fsdp_reduce_dtype": "bf16"}),
], ids=["ddp", "fsdp2-bf16-parameters-and-reduction"])
def test_bf16_training_under_ddp_and_fsdp2_keeps_ranks_in_sync(tmp_path, parallel, extra):
    """train.precision=bf16 under DDP (gradients as bucket views), or with FSDP2's
    mixed-precision policy (bf16 parameters gathered, gradients reduced in bf16): the ranks stay
    identical and the checkpoint holds the fp32 master weights. (DDP's bf16 gradient hook needs
    NCCL: tests/test_train.py checks its refusal on a CPU.)"""
    report, run = run_mnist(tmp_path, parallel, **{"train.precision": "bf16", **extra})
    assert report["step"] == STEPS and report["fsdp"] == (parallel == "fsdp")
    for rank in report["ranks"]:
        assert rank and all(rank.values()), rank
    tensors = open_checkpoint(run / "checkpoints" / checkpoint_name(STEPS)).tensors("model")
    weights = [v for v in tensors.values() if v.is_floating_point()]
    assert weights and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)


@pytest.mark.slow
def test_fsdp2_bf16_keeps_the_timestep_and_the_residual_stream_in_fp32(tmp_path):
    """FSDP2's mixed precision casts a unit's float inputs to bf16 by default, where 777 is 776
    and 999 is 1000; with ``cast_forward_inputs=False`` the timestep embedder and the blocks see
    fp32, as under DDP with autocast, and one step's loss agrees with DDP's to bf16 rounding."""
    proc = torchrun("precision", str(ROOT / "configs" / "digits_tiny.yaml"),
                    str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["seen"]["t_embedder"] == {"dtype": "torch.float32", "values": r["t"] * 2}
    assert r["seen"]["block0"]["dtype"] == "torch.float32"
    fsdp, ddp = r["losses"]["fsdp"], r["losses"]["ddp"]
    assert ddp > 0.1
    # FSDP2 rounds the parameters to bf16 once, where autocast rounds them at each matmul; the
    # embedding table, the biases and the router then differ in the last bf16 bit.
    assert fsdp == pytest.approx(ddp, rel=BF16_STEP_REL)


# Uneven shards on 3 ranks (a 10 + 1 class table, 32-row projections), expert choice with shared
# and fine-grained experts, and a text model with cross-attention and the final convolution.
INIT_CONFIGS = ",".join([
    str(ROOT / "configs" / "digits_tiny.yaml"),
    "+".join([str(ROOT / "configs" / "digits_tiny.yaml"), "model.moe.type=expert_choice",
              "model.moe.shared_experts=1", "model.moe.granularity=2"]),
    "+".join([str(ROOT / "configs" / "t2i_shapes_diffmoe.yaml"), "model.final_conv=true"]),
])


@pytest.mark.slow
def test_fsdp2_ranks_fill_only_their_shards_with_the_weights_of_the_model_built_whole(tmp_path):
    """Built on the meta device and sharded over 3 ranks, each filling its shards from the
    initialisation plan: gathered, the model and its EMA are the model built whole on the CPU
    from the same seed, bit for bit (the same draws, in the same order, on the same CPU)."""
    proc = jobs.torchrun([str(HERE / "scale_check.py"), "init", INIT_CONFIGS,
                          str(tmp_path / "r.json")], TIMEOUT_S, nproc=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report) == 3 and all(report.values()), report


@pytest.mark.numerics
def test_activation_checkpointing_keeps_gradients_and_moves_thresholds_once():
    cfg = load_config(ROOT / "configs" / "digits_tiny.yaml", ["model.class_dropout=0"])
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing = True
    x, t, y = torch.randn(8, 1, 8, 8), torch.rand(8) * 1000, torch.randint(0, 10, (8,))
    for m in (plain, ckpt):
        out = m(x, t, y)
        (out.prediction.pow(2).mean() + out.predictor_loss).backward()  # recomputes ckpt's blocks
        apply_threshold_updates(diffmoe_layers(m), [o.threshold_targets_E for o in out.layers])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    tau_plain, tau_ckpt = (m.moe_layers()[0].thresholds_E for m in (plain, ckpt))
    assert tau_plain.abs().sum() > 0
    torch.testing.assert_close(tau_plain, tau_ckpt, rtol=0, atol=0)


def test_gradient_accumulation_pools_each_micro_batch(tmp_path, monkeypatch):
    from diffmoe.models.moe.diffmoe import DiffMoE
    from diffmoe.train import Trainer

    pools = []
    original = DiffMoE.route_and_compute

    def spy(self, x_SD, batch, routing):
        if self.training:
            pools.append(x_SD.shape[0])
        return original(self, x_SD, batch, routing)

    monkeypatch.setattr(DiffMoE, "route_and_compute", spy)
    cfg = load_config(ROOT / "configs" / "digits_tiny.yaml",
                      [f"train.out_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=16",
                       "train.grad_accum=4", "train.ckpt_every=2", "train.sample_every=2",
                       "sample.steps=1", "sample.num=2", "sample.batch_size=2"])
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    tokens = (8 // 2) ** 2  # digits 8x8, patch 2
    assert pools == [4 * tokens] * 8  # 2 steps x 4 micro-batches of 4 images, one pool each
    assert trainer.step == 2


IMAGENET_CONFIGS = sorted((ROOT / "configs" / "imagenet").glob("*.yaml"))


@pytest.mark.parametrize("path", IMAGENET_CONFIGS, ids=[p.stem for p in IMAGENET_CONFIGS])
def test_imagenet_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.batch_size == 256 and cfg.train.lr == 1e-4
    assert cfg.data.name == "latents" and cfg.model.input_size == 32
    assert cfg.model.moe.type == "diffmoe"
    assert cfg.objective.type == path.stem.rsplit("-", 1)[1]
    assert cfg.model.learn_sigma == (cfg.objective.type == "ddpm")
