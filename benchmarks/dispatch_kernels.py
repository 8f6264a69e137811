"""The kernels of unequal expert counts at dynamic inference: ``padded_bmm`` (every expert padded
to the largest count, one batched matmul per projection) against ``loop`` (one expert at a time),
at the S-E16 and B-E16 shapes (8 samples x 256 tokens, both halves of classifier-free guidance,
16 experts of width 4D), for counts from equal to skewed (expert e's share proportional to
skew^-e), forward only with the counts on the host, as ``MoELayer.run_grouped`` runs them. The
figure behind ``PADDED_BMM_MAX_WASTE`` in ``diffmoe/models/moe/base.py``.

    python benchmarks/dispatch_kernels.py [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse

import torch
from common import emit, interleaved_medians, machine, table

from diffmoe.config import MoEConfig
from diffmoe.models.moe import build_ffn

SHAPES = {"S-E16": 384, "B-E16": 768}
EXPERTS, TOKENS = 16, 2 * 8 * 256
SKEWS = (1.0, 1.05, 1.1, 1.3)


def skewed_counts(tokens: int, experts: int, skew: float) -> list[int]:
    """``tokens`` rows over ``experts``, expert e's share proportional to skew^-e."""
    share = torch.tensor([skew ** -e for e in range(experts)], dtype=torch.float64)
    counts = (share / share.sum() * tokens).floor().long()
    counts[0] += tokens - int(counts.sum())
    return counts.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    rows = []
    for shape, dim in SHAPES.items():
        layers = {k: build_ffn(MoEConfig(type="diffmoe", num_experts=EXPERTS, dispatch=k), dim,
                               4 * dim).eval() for k in ("padded_bmm", "loop")}
        layers["loop"].load_state_dict(layers["padded_bmm"].state_dict())
        x_SD = torch.randn(TOKENS, dim)
        for skew in SKEWS:
            counts = skewed_counts(TOKENS, EXPERTS, skew)
            tok_T = torch.cat([torch.randperm(TOKENS)[:k] for k in counts])
            w_T, counts_E = torch.rand(tok_T.shape[0]), torch.tensor(counts)

            def task(layer):
                def run() -> None:
                    with torch.no_grad():
                        layer.run_grouped(x_SD, tok_T, w_T, counts_E, host_counts=counts)
                return run

            times = interleaved_medians({k: task(v) for k, v in layers.items()}, args.repeats,
                                        1, device)
            rows.append({"shape": shape, "skew": skew,
                         "padding": EXPERTS * max(counts) / TOKENS - 1.0,
                         "padded_ms": 1e3 * times["padded_bmm"], "loop_ms": 1e3 * times["loop"],
                         "loop/padded": times["loop"] / times["padded_bmm"]})
    emit({"machine": machine(), "rows": rows},
         table(rows, ["shape", "skew", "padding", "padded_ms", "loop_ms", "loop/padded"]),
         args.json)


if __name__ == "__main__":
    main()
