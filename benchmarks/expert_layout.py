"""Which memory layout of the stacked expert weights the CPU's batched GEMMs run fastest: each
expert projection, forward and forward+backward, with its weight stored (E, in, out) (x @ W, the
layout before issue 36) or (E, out, in) (x @ Wᵀ, nn.Linear's layout and the authors'), at the
S-E16 and B-E16 shapes (E = 16 experts of width 4D, k = 128 tokens each: 8 × 256 tokens at
capacity 1). Runs are interleaved and medians reported as GFLOP/s. Run it once natively and once
with ``MKL_CBWR=AVX2`` (MKL's other code path, what an Intel machine's rounding looks like here)
to see both paths:

    python benchmarks/expert_layout.py [--repeats 20] [--dtype fp32|bf16] [--json]
"""

from __future__ import annotations

import argparse
import os

import torch
from common import emit, interleaved_medians, machine, table

SHAPES = {"S-E16": 384, "B-E16": 768}
EXPERTS, ROWS, EXPANSION = 16, 128, 4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def projection_tasks(d_in: int, d_out: int, dtype: torch.dtype, backward: bool) -> dict:
    """One expert projection, x_Ek[in] → y_Ek[out], with the weight in each layout."""
    x = torch.randn(EXPERTS, ROWS, d_in, dtype=dtype, requires_grad=backward)
    b = torch.zeros(EXPERTS, 1, d_out, dtype=dtype, requires_grad=backward)
    w_in_out = (torch.randn(EXPERTS, d_in, d_out, dtype=dtype) * d_in ** -0.5).requires_grad_(
        backward)
    w_out_in = w_in_out.detach().transpose(1, 2).contiguous().requires_grad_(backward)

    def run(weight_fn):
        def task():
            y = torch.baddbmm(b, x, weight_fn())
            if backward:
                y.sum().backward()
        return task

    return {"(E, in, out)": run(lambda: w_in_out), "(E, out, in)": run(lambda: w_out_in.mT)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    rows = []
    for shape, dim in SHAPES.items():
        hidden = EXPANSION * dim
        for proj, (d_in, d_out) in {"first (D→4D)": (dim, hidden),
                                    "second (4D→D)": (hidden, dim)}.items():
            for backward in (False, True):
                tasks = projection_tasks(d_in, d_out, dtype, backward)
                med = interleaved_medians(tasks, args.repeats, warmup=3,
                                          device=torch.device("cpu"))
                flops = 2 * EXPERTS * ROWS * d_in * d_out * (3 if backward else 1)
                rates = {k: flops / t / 1e9 for k, t in med.items()}
                rows.append({"shape": shape, "projection": proj,
                             "pass": "fwd+bwd" if backward else "fwd",
                             **{f"{k} GFLOP/s": round(v, 1) for k, v in rates.items()},
                             "(E, out, in) / (E, in, out)": round(
                                 rates["(E, out, in)"] / rates["(E, in, out)"], 2)})
    result = {"machine": machine(), "dtype": args.dtype,
              "MKL_CBWR": os.environ.get("MKL_CBWR", "(native)"), "rows": rows}
    header = f"{result['machine']} · {args.dtype} · MKL_CBWR={result['MKL_CBWR']}\n"
    emit(result, header + table(rows, list(rows[0])), args.json)


if __name__ == "__main__":
    main()
