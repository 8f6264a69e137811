"""Router and capacity predictor over the pool: as the DiffMoE layer computes them (the router's
Linear(D, E) in float32, the predictor's Linear(D, D) → SiLU → Linear(D, E) on the detached
pool) against one Linear(D, E + D) GEMM for the router and the predictor's first layer, split
after it (issue 36's proposal). The fused form's backward gives the pool the router's gradient
only (the predictor's stop-gradient), and both forms are checked to give the same values and
gradients before they are timed, forward alone (dynamic inference) and forward + backward
(training), interleaved, at the S-E16 and B-E16 shapes (8 x 256 tokens).

Under bf16 autocast the layer runs the router in float32 (so top-k does not depend on the
precision) and the predictor in bf16; one GEMM has one dtype, so the fused rows run in float32.

    python benchmarks/router_predictor.py [--repeats 30] [--dtype fp32|bf16] [--json]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import emit, interleaved_medians, machine, table
from moe_layer import SAMPLES, SHAPES, TOKENS

from diffmoe.models.moe.base import Router
from diffmoe.models.moe.diffmoe import CapacityPredictor


class FusedFirstLayer(torch.autograd.Function):
    """[router logits | predictor hidden] = x · [W_r; W_1]ᵀ + [0; b_1]; the gradient reaching x
    is the router part's only (the predictor reads the detached pool)."""

    @staticmethod
    def forward(ctx, x_SD, w_MD, b_M, experts):
        ctx.save_for_backward(x_SD, w_MD)
        ctx.experts = experts
        return torch.addmm(b_M, x_SD, w_MD.t())

    @staticmethod
    def backward(ctx, g_SM):
        x_SD, w_MD = ctx.saved_tensors
        g_x = g_SM[:, :ctx.experts] @ w_MD[:ctx.experts]
        return g_x, g_SM.t() @ x_SD, g_SM.sum(0), None


class Separate(torch.nn.Module):
    """The layer's router and predictor."""

    def __init__(self, router: Router, predictor: CapacityPredictor):
        super().__init__()
        self.router, self.predictor = router, predictor

    def forward(self, x_SD):
        return self.router(x_SD), self.predictor(x_SD)


class Fused(torch.nn.Module):
    """The same weights concatenated for one float32 GEMM."""

    def __init__(self, router: Router, predictor: CapacityPredictor):
        super().__init__()
        experts = router.weight_ED.shape[0]
        self.experts = experts
        with torch.no_grad():
            self.w_MD = torch.nn.Parameter(torch.cat([router.weight_ED, predictor.fc1.weight]))
            self.b_M = torch.nn.Parameter(torch.cat([predictor.fc1.bias.new_zeros(experts),
                                                     predictor.fc1.bias]))
        self.fc2 = predictor.fc2

    def forward(self, x_SD):
        with torch.autocast(x_SD.device.type, enabled=False):
            out_SM = FusedFirstLayer.apply(x_SD.float(), self.w_MD, self.b_M, self.experts)
            scores_SE = out_SM[:, :self.experts].softmax(dim=-1)
            logits_SE = self.fc2(F.silu(out_SM[:, self.experts:]))
        return scores_SE, logits_SE


def check_same(separate: Separate, fused: Fused, x_SD: torch.Tensor) -> None:
    """Values, the pool's gradient and the weights' gradients agree (float32 rounding)."""
    results = []
    for module in (separate, fused):
        x = x_SD.clone().requires_grad_(True)
        scores, logits = module(x)
        (scores.square().sum() + logits.square().sum()).backward()
        results.append((scores, logits, x.grad))
    for a, b in zip(*results):
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise RuntimeError("the fused router + predictor does not compute the separate ones")
    w_grad = torch.cat([separate.router.weight_ED.grad, separate.predictor.fc1.weight.grad])
    if not torch.allclose(fused.w_MD.grad, w_grad, rtol=1e-4, atol=1e-4):
        raise RuntimeError("the fused weight gradient differs from the separate layers'")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    device = torch.device("cpu")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    rows = []
    for name in args.shapes:
        dim, experts = SHAPES[name]["dim"], SHAPES[name]["experts"]
        torch.manual_seed(0)
        separate = Separate(Router(dim, experts, init_std=0.006), CapacityPredictor(dim, experts))
        fused = Fused(separate.router, separate.predictor)
        x = torch.randn(SAMPLES * TOKENS, dim)
        check_same(separate, fused, x)

        def fwd(module):
            def run():
                with torch.no_grad(), autocast:
                    module(x)
            return run

        def fwd_bwd(module):
            xg = x.clone().requires_grad_(True)

            def run():
                for param in module.parameters():
                    param.grad = None
                with autocast:
                    scores, logits = module(xg)
                (scores.float().square().sum() + logits.float().square().sum()).backward()
            return run

        modules = {"separate": separate, "fused": fused}
        f = interleaved_medians({k: fwd(m) for k, m in modules.items()}, args.repeats,
                                args.warmup, device)
        fb = interleaved_medians({k: fwd_bwd(m) for k, m in modules.items()}, args.repeats,
                                 args.warmup, device)
        rows += [{"shape": name, "form": k, "fwd_ms": 1e3 * f[k], "fwd_bwd_ms": 1e3 * fb[k],
                  "fwd_speedup": f["separate"] / f[k], "fwd_bwd_speedup": fb["separate"] / fb[k]}
                 for k in modules]
    result = {"benchmark": "router_predictor", "machine": machine(), "dtype": args.dtype,
              "tokens": SAMPLES * TOKENS, "rows": rows}
    emit(result, table(rows, ["shape", "form", "fwd_ms", "fwd_bwd_ms", "fwd_speedup",
                              "fwd_bwd_speedup"]), args.json)


if __name__ == "__main__":
    main()
