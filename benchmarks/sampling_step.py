"""Sampling: one denoising step (one model forward at inference) of DiffMoE-S-E16 in dynamic
mode at several average capacities, vs Dense-DiT-S, in fp32 and under bf16 autocast
(``sample.precision=bf16``; on a CPU with bf16 units, AVX512-BF16 or AMX, its matmuls run on
them), all interleaved in one process. Reports each row's time and images/s, its ratio to dense
in the same precision, and bf16's speed-up over fp32 for the same model.

The thresholds are set per expert to the quantile of the capacity predictor's probabilities on
the benchmark batch that gives each expert about S*C/E tokens, so the measured C_avg is close to
the target C (reported as measured).

Each timed unit is ``--chain`` forwards inside one autocast region, as a sampling batch runs all
its steps in one (``diffmoe.diffusion.sample``): autocast keeps its casts of the ``nn.Linear``
weights for the region, and the experts' stacked weights are cast once for it
(``cast_experts_once``); the figures are per forward. ``--cast-every-step`` adds bf16 rows of
each DiffMoE model with the experts cast at every forward, as before ``cast_experts_once``.

    python benchmarks/sampling_step.py [--batch 8] [--capacities 0.5 1.0 1.5] [--chain 4]
                                       [--dtypes fp32 bf16] [--cast-every-step] [--json]
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch
from common import add_allocator_arg, allocator, emit, interleaved_medians, machine, table

from diffmoe.capacity import forward_capacity
from diffmoe.config import load_config
from diffmoe.device import autocast
from diffmoe.models import build_model
from diffmoe.models.moe import Routing, cast_experts_once, compute_dtype, diffmoe_layers


DTYPES = ("fp32", "bf16")


def calibrate_thresholds(model, x, t, y, capacity: float) -> None:
    """Set each DiffMoE layer's thresholds so that expert e takes about S*C/E tokens."""
    captured = {}

    def hook(layer):
        def fn(module, args, out):
            captured[layer] = out.predictor_logits_SE
        return fn

    layers = diffmoe_layers(model)
    handles = [m.register_forward_hook(hook(m)) for m in layers]
    with torch.no_grad():
        for m in layers:
            m.thresholds_E.fill_(0.5)
        model(x, t, y, Routing("dynamic"))
    for h in handles:
        h.remove()
    for m in layers:
        probs = torch.sigmoid(captured[m].float())
        q = min(1.0, max(0.0, 1.0 - capacity / m.base_experts))
        m.thresholds_E.copy_(probs.quantile(q, dim=0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--capacities", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--chain", type=int, default=4,
                   help="forwards per timed autocast region (a sampling batch's steps)")
    p.add_argument("--cast-every-step", action="store_true",
                   help="also time bf16 DiffMoE with the experts cast at every forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    p.add_argument("--json", action="store_true")
    add_allocator_arg(p)
    args = p.parse_args()
    malloc = allocator(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 4, 32, 32, device=device)
    t = torch.rand(args.batch, device=device) * 1000
    y = torch.randint(0, 1000, (args.batch,), device=device)

    dense = build_model(load_config(None, ["model.preset=Dense-DiT-S"]).model).to(device).eval()
    tasks, measured = {}, {}

    def forward(model, routing, precision, chain=1, cast_once=True):
        def run():
            with torch.no_grad(), autocast(precision, device):
                held = cast_experts_once(model, compute_dtype(x)) if cast_once else nullcontext()
                with held:
                    for _ in range(chain):
                        out = model(x, t, y, routing)
            return out
        return run

    models = {"Dense-DiT-S": (dense, Routing("static"))}
    moe_cfg = load_config(None, ["model.preset=DiffMoE-S-E16"]).model
    for cap in args.capacities:
        torch.manual_seed(0)
        model = build_model(moe_cfg).to(device).eval()
        # Random non-zero weights in the adaLN projections so the layers see varied inputs.
        for blk in model.blocks:
            torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.02)
        calibrate_thresholds(model, x, t, y, cap)
        name = f"DiffMoE-S-E16 C~{cap:g}"
        models[name] = (model, Routing("dynamic"))
        # The capacity each precision reaches with the fp32-calibrated thresholds.
        for precision in args.dtypes:
            measured[name, precision] = float(forward_capacity(
                forward(model, Routing("dynamic"), precision)().layers))
    tasks = {(name, precision, "once"): forward(model, routing, precision, args.chain)
             for name, (model, routing) in models.items() for precision in args.dtypes}
    if args.cast_every_step:
        tasks.update({(name, "bf16", "every step"): forward(model, routing, "bf16", args.chain,
                                                            cast_once=False)
                      for name, (model, routing) in models.items() if name != "Dense-DiT-S"})
    faults: dict = {}
    times = {key: seconds / args.chain for key, seconds in
             interleaved_medians(tasks, args.repeats, args.warmup, device, faults).items()}
    rows = []
    for (name, precision, cast), seconds in times.items():
        row = {"model": name, "precision": precision, "experts_cast": cast,
               "c_avg": measured.get((name, precision), 1.0), "step_ms": 1e3 * seconds,
               "images_per_s": args.batch / seconds,
               "vs_dense": seconds / times["Dense-DiT-S", precision, "once"]}
        if precision != "fp32" and (name, "fp32", "once") in times:
            row["speedup_vs_fp32"] = times[name, "fp32", "once"] / seconds
        rows.append(dict(row, page_faults=faults[name, precision, cast] / args.chain))
    result = {"benchmark": "sampling_step", "machine": machine(), "allocator": malloc,
              "batch": args.batch, "chain": args.chain, "rows": rows}
    emit(result, table(rows, ["model", "precision", "experts_cast", "c_avg", "step_ms", "images_per_s",
                              "vs_dense", "speedup_vs_fp32", "page_faults"]), args.json)


if __name__ == "__main__":
    main()
