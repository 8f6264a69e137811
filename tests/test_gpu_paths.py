"""What only a GPU runs (marked ``cuda``: skipped on a CPU, run by benchmarks/gpu_check): the
bf16 grouped-GEMM expert kernel in training with odd token counts and an idle expert, and in
dynamic sampling; FSDP2 in bf16 keeping the timestep fp32 on CUDA; one sharded save on one GPU
read back resharded without a process group; and the FID Inception on the GPU.

Each check is a function of the device and process-group backend, so that it can be run on the
CPU by hand (``check_*(torch.device("cpu"), "gloo")``) to check the check itself."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from diffmoe import parallel
from diffmoe.checkpoint import open_checkpoint, save_sharded_checkpoint
from diffmoe.config import load_config
from diffmoe.models import build_model
from diffmoe.models.moe import DiffMoE, Routing
from diffmoe.models.moe.token_choice import TokenChoiceMoE

pytestmark = pytest.mark.cuda

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_tiny.yaml"
CUDA = torch.device("cuda")
DIM, HIDDEN, EXPERTS = 64, 256, 4  # widths grouped_mm's fast kernel takes (16-byte rows)
IDLE = EXPERTS - 1  # the expert that gets no token
SHAPE = (3, 7, DIM)  # 21 tokens: no expert's count a multiple of 8
BF16_REL = 3e-2  # bf16 against fp32 through two projections, relative to the largest value
PRECISION_T = (777.0, 999.0)  # timesteps bf16 cannot hold


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def idle_last_expert(layer: torch.nn.Module) -> None:
    """No token routes to the last expert: its router row points away from every input (the
    inputs are positive, :func:`positive_tokens`)."""
    with torch.no_grad():
        layer.router.weight_ED[IDLE] = -10.0


def positive_tokens(device: torch.device) -> torch.Tensor:
    return torch.rand(SHAPE, device=device) + 0.1


def moe_pair(cls, device: torch.device, kernel: str, **kwargs):
    torch.manual_seed(0)
    fast = cls(DIM, HIDDEN, EXPERTS, capacity=1.0, dispatch=kernel, **kwargs).to(device)
    reference = cls(DIM, HIDDEN, EXPERTS, capacity=1.0, dispatch="loop", **kwargs).to(device)
    reference.load_state_dict(fast.state_dict())
    for layer in (fast, reference):
        idle_last_expert(layer)
    return fast, reference


def check_token_choice_training(device: torch.device, kernel: str = "grouped_mm") -> None:
    fast, reference = moe_pair(TokenChoiceMoE, device, kernel)
    x = positive_tokens(device)
    outs, grads = [], []
    for layer, dtype in ((fast, torch.bfloat16), (reference, None)):
        xi = x.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None):
            out = layer(xi)
        assert int(out.counts_E[IDLE]) == 0 and int(out.counts_E.sum()) == SHAPE[0] * SHAPE[1]
        out.y.float().pow(2).mean().backward()
        outs.append(out.y)
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    assert relative_error(outs[0], outs[1]) < BF16_REL
    for g_fast, g_ref in zip(*grads):
        if g_ref is not None and g_ref.abs().max() > 0:
            assert relative_error(g_fast, g_ref) < BF16_REL
    idle = fast.experts.w1_EDF.grad[IDLE]
    assert torch.count_nonzero(idle) == 0  # an idle expert gets a zero gradient, not garbage


def check_dynamic_sampling(device: torch.device, kernel: str = "grouped_mm") -> None:
    fast, reference = moe_pair(DiffMoE, device, kernel)
    with torch.no_grad():
        for layer in (fast, reference):
            layer.thresholds_E.fill_(0.5)
            layer.eval()
        x = positive_tokens(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = fast(x, Routing("dynamic")).y
        y_ref = reference(x, Routing("dynamic")).y
    assert relative_error(y, y_ref) < BF16_REL


@contextlib.contextmanager
def one_rank_group(backend: str):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_fsdp2_bf16_timestep(device: torch.device, backend: str = "nccl") -> None:
    cfg = load_config(CONFIG)
    with one_rank_group(backend):
        model = build_model(cfg.model).to(device)
        parallel.shard(model, "bf16")
        seen = {}
        model.t_embedder.register_forward_pre_hook(lambda m, args: seen.update(t=args[0]))
        t = torch.tensor(PRECISION_T, device=device)
        x = torch.randn(2, 1, 8, 8, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(x, t, torch.tensor([1, 2], device=device))
    assert seen["t"].dtype == torch.float32 and seen["t"].tolist() == list(PRECISION_T)


def check_sharded_checkpoint(device: torch.device, root: Path, backend: str = "nccl") -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from diffmoe.train import build_models, build_optimizer

    cfg = load_config(CONFIG)
    with one_rank_group(backend):
        module, ema = build_models(cfg, device, fsdp=True)
        optimizer = build_optimizer(module, cfg.train)
        x = torch.randn(4, 1, 8, 8, device=device)
        t = torch.rand(4, device=device) * 1000
        module(x, t, torch.arange(4, device=device)).prediction.pow(2).mean().backward()
        optimizer.step()
        whole = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=True))
        save_sharded_checkpoint(root, 1, parallel.sharded_parts(module, ema, optimizer), {},
                                {"world_size": 1})
    ckpt = open_checkpoint(root / "step_00000001", check_hashes=True)
    assert ckpt.sharded
    read = ckpt.tensors("model")  # one process, no group, on the CPU
    assert read.keys() == whole.keys() and all(torch.equal(read[k], whole[k]) for k in read)
    plain = build_model(cfg.model).to(device)  # and into an unsharded model on the GPU
    plain_opt = build_optimizer(plain, cfg.train)
    parallel.load_sharded(ckpt, plain, build_model(cfg.model).to(device), plain_opt)
    held = plain.state_dict()
    assert all(torch.equal(held[k].cpu(), whole[k]) for k in whole)


def check_fid_features(device: torch.device) -> None:
    from diffmoe.data import build_dataset
    from diffmoe.errors import DataError
    from diffmoe.evaluation.inception import InceptionFeatures

    try:
        cpu = InceptionFeatures(device="cpu")
    except DataError as exc:
        pytest.skip(f"the FID Inception is not installed here: {exc}")
    images = build_dataset("digits", "test").images[:8]
    reference = cpu(images)
    fp32 = InceptionFeatures(device=device)(images)
    bf16 = InceptionFeatures(precision="bf16", device=device)(images)
    assert fp32.device.type == device.type and fp32.shape == reference.shape
    assert relative_error(fp32.cpu(), reference) < 1e-2  # TF32 convolutions on the GPU
    assert relative_error(bf16.cpu(), reference) < 5e-2


def test_grouped_mm_bf16_training_with_odd_counts_and_an_idle_expert():
    check_token_choice_training(CUDA)


def test_grouped_mm_bf16_dynamic_sampling():
    check_dynamic_sampling(CUDA)


def test_fsdp2_bf16_keeps_the_timestep_fp32_on_cuda():
    check_fsdp2_bf16_timestep(CUDA)


def test_a_sharded_checkpoint_saved_on_one_gpu_is_read_back_resharded(tmp_path):
    check_sharded_checkpoint(CUDA, tmp_path)


def test_fid_features_on_the_gpu():
    check_fid_features(CUDA)
