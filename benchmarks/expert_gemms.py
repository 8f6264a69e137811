"""Where the MoE layer's distance to dense comes from: each GEMM of the stacked experts (E = 16
experts, k = 128 rows each) against the same GEMM of the dense FFN (one matrix, E·k = 2,048 rows)
at capacity 1, so both do the same FLOPs: the forward (x·W), the input gradient (g·Wᵀ), the
weight gradient (xᵀ·g, inner dimension k for the experts against E·k for dense, and E times the
output), each for the first projection (D → 4D), and the cast of the fp32 weights to bf16 that
autocast needs for every step of training (E times the bytes for the experts). Interleaved
medians, at the S-E16 and B-E16 shapes, with the expert / dense ratio.

    python benchmarks/expert_gemms.py [--repeats 15] [--json]
"""

from __future__ import annotations

import argparse

import torch
from common import emit, interleaved_medians, machine, table
from expert_layout import EXPANSION, EXPERTS, ROWS, SHAPES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_tasks(dim: int, dtype: torch.dtype) -> dict[str, tuple]:
    """(experts' task, dense task) for each GEMM of the first projection, and the weight cast."""
    hidden = EXPANSION * dim
    x_EkD = torch.randn(EXPERTS, ROWS, dim, dtype=dtype)
    g_EkF = torch.randn(EXPERTS, ROWS, hidden, dtype=dtype)
    w_EDF = torch.randn(EXPERTS, dim, hidden, dtype=dtype) * dim ** -0.5
    x_SD, g_SF, w_DF = x_EkD.view(-1, dim), g_EkF.view(-1, hidden), w_EDF[0]
    tasks = {
        "forward x·W": (lambda: torch.bmm(x_EkD, w_EDF), lambda: x_SD @ w_DF),
        "input gradient g·Wᵀ": (lambda: torch.bmm(g_EkF, w_EDF.mT), lambda: g_SF @ w_DF.t()),
        "weight gradient xᵀ·g": (lambda: torch.bmm(x_EkD.mT, g_EkF), lambda: x_SD.t() @ g_SF),
    }
    if dtype == torch.bfloat16:
        master_EDF = torch.randn(EXPERTS, dim, hidden)
        tasks["weight cast fp32 → bf16"] = (lambda: master_EDF.to(dtype),
                                             lambda: master_EDF[0].to(dtype))
    return tasks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = []
    for shape, dim in SHAPES.items():
        for name, dtype in DTYPES.items():
            tasks = gemm_tasks(dim, dtype)
            flat = {(op, who): fn for op, pair in tasks.items()
                    for who, fn in zip(("experts", "dense"), pair)}
            med = interleaved_medians(flat, args.repeats, warmup=3, device=torch.device("cpu"))
            rows += [{"shape": shape, "dtype": name, "op": op,
                      "experts_ms": 1e3 * med[op, "experts"], "dense_ms": 1e3 * med[op, "dense"],
                      "ratio": med[op, "experts"] / med[op, "dense"]} for op in tasks]
    result = {"benchmark": "expert_gemms", "machine": machine(), "experts": EXPERTS,
              "rows_per_expert": ROWS, "rows": rows}
    emit(result, table(rows, ["shape", "dtype", "op", "experts_ms", "dense_ms", "ratio"]),
         args.json)


if __name__ == "__main__":
    main()
