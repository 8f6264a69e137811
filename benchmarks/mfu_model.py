"""On paper: what bounds the model-FLOPs utilisation of DiffMoE-B-E16 training (against the dense
DiT-B) on an H200 and an H100, per GPU batch (docs/performance.md, "Model FLOPs and MFU").

Per step and GPU it adds the model FLOPs at the chip's peak to the memory-bound work that grows
with the *total* parameter count rather than the activated one: fused AdamW (reads parameter,
gradient and both moments, writes parameter and moments, fp32) and the EMA (reads EMA and
parameter, writes EMA), at the chip's memory bandwidth; and, for 8 GPUs under DDP, the gradient
all-reduce over NVLink (ring: each GPU sends and receives 2(N-1)/N of the gradients), which
overlaps with the backward when it is shorter than it. Nothing here is measured.

    python benchmarks/mfu_model.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import table  # noqa: E402
from flops import model_config, training_flops_per_image  # noqa: E402

from diffmoe.models import build_model  # noqa: E402

# Data-sheet figures (SXM parts): dense bf16 tensor FLOP/s, HBM bytes/s, NVLink bytes/s per
# direction.
CHIPS = {"H200": (989e12, 4.8e12, 450e9), "H100": (989e12, 3.35e12, 450e9)}
FP32_BYTES = 4
ADAMW_TENSORS_MOVED = 7  # read p, g, m, v; write p, m, v
EMA_TENSORS_MOVED = 3  # read ema, p; write ema
GPUS = 8
BACKWARD_SHARE = 2 / 3  # of the step's FLOPs: the window the all-reduce can hide in
BATCHES = (32, 64, 128)


def rows_for(preset: str) -> list[dict]:
    m = model_config(preset)
    params = build_model(m).num_params()
    flops = training_flops_per_image(m)
    rows = []
    for chip, (peak, hbm, nvlink) in CHIPS.items():
        update_s = params * FP32_BYTES * (ADAMW_TENSORS_MOVED + EMA_TENSORS_MOVED) / hbm
        allreduce_s = 2 * (GPUS - 1) / GPUS * params * FP32_BYTES / nvlink
        for batch in BATCHES:
            compute_s = batch * flops / peak
            exposed_s = max(0.0, allreduce_s - BACKWARD_SHARE * compute_s)
            rows.append({"model": preset, "chip": chip, "batch_per_gpu": batch,
                         "compute_ms": 1e3 * compute_s, "adamw_ema_ms": 1e3 * update_s,
                         "allreduce_ms": 1e3 * allreduce_s, "exposed_ms": 1e3 * exposed_s,
                         "MFU_bound": compute_s / (compute_s + update_s + exposed_s)})
    return rows


def main() -> None:
    rows = rows_for("DiffMoE-B-E16") + rows_for("Dense-DiT-B")
    print(table(rows, ["model", "chip", "batch_per_gpu", "compute_ms", "adamw_ema_ms",
                       "allreduce_ms", "exposed_ms", "MFU_bound"]))


if __name__ == "__main__":
    main()
