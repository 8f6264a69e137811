"""MoE layer speed: forward and forward+backward of the dense FFN, diffmoe, expert_choice,
token_choice, and three naive DiffMoE implementations (per-expert loop, E x S buffer, one-hot
einsums; checked to compute the same output as ours), at the S-E16 and B-E16 shapes (8 samples x
256 tokens; D = 384 or 768; 16 experts of width 4D; capacity 1, so every variant has the dense
FFN's activated FLOPs). At inference (forward only): diffmoe in dynamic mode (Eq. 14) with each
expert's threshold at the quantile of its predicted probabilities that gives it S*C/E tokens (as
Eq. 17 sets it), and the authors' per-expert loop with ``topk`` on the same thresholds (checked
to compute the same output), and the capacity predictor alone (``predictor_only``), which with
``experts_only`` (the expert GEMMs alone) bounds what the dynamic layer can cost. Runs are
interleaved and medians reported, with ratios to dense.

``--against REV`` adds the diffmoe layer of git revision ``REV`` (``diffmoe@REV`` in training,
``diffmoe_dynamic@REV`` in dynamic inference), imported in this process from ``git archive`` as
a package of its own name, with this checkout's weights and thresholds (checked to compute the
same output), so both codes are timed in one interleaved run. ``--chain N`` times N forwards per
inference region, as sampling runs its steps in one autocast region (with ``--dtype bf16``:
autocast keeps its casts of ``nn.Linear`` weights, and the experts' stacked weights are cast once
by ``cast_experts_once``, as ``diffmoe.diffusion.sample`` does); training rows cast every step.

    python benchmarks/moe_layer.py [--shapes S-E16 B-E16] [--layers ...] [--repeats 15]
                                   [--dtype fp32|bf16] [--chain 4] [--against REV] [--json]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import add_allocator_arg, allocator, emit, interleaved_medians, machine, table
from train_step import export_revision

from diffmoe.config import MoEConfig
from diffmoe.models.moe import (
    FeedForward,
    Routing,
    build_ffn,
    cast_experts_once,
    compute_dtype,
    expert_capacity,
)
from diffmoe.models.moe.diffmoe import CapacityPredictor

SHAPES = {"S-E16": dict(dim=384, experts=16), "B-E16": dict(dim=768, experts=16)}
SAMPLES, TOKENS = 8, 256


class NaiveDiffMoE(nn.Module):
    """The straightforward implementations of the DiffMoE training layer that issue #3 names, for
    reference: the same router, capacity predictor (forward only, as in our layer here: the
    benchmark's loss does not include its BCE) and per-expert top-k over the batch pool, with
    the experts run one of three ways:

    * ``loop``: a Python list of expert modules, each gathering its top-k tokens and adding its
      weighted output back with ``index_add``;
    * ``buffer``: each expert's weighted output scattered into an (E, S, D) buffer of zeros,
      summed over experts at the end (the layout of the authors' public code);
    * ``onehot``: one-hot dispatch and combine tensors (S, E, k) applied with einsums
      (GShard/Switch style), experts as one stacked batched matmul.
    """

    def __init__(self, dim: int, hidden: int, experts: int, style: str, capacity: float = 1.0):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.predictor = CapacityPredictor(dim, experts)
        self.experts = nn.ModuleList(FeedForward(dim, hidden) for _ in range(experts))
        self.style, self.capacity = style, capacity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, s, D = x.shape
        pool = x.reshape(B * s, D)
        S, E = pool.shape[0], len(self.experts)
        scores = self.router(pool).softmax(-1)
        self.predictor(pool)
        k = expert_capacity(S, self.capacity, E)
        w_Ek, idx_Ek = scores.t().topk(k, dim=-1)
        if self.style == "loop":
            out = torch.zeros_like(pool)
            for e, expert in enumerate(self.experts):
                out = out.index_add(0, idx_Ek[e], expert(pool[idx_Ek[e]]) * w_Ek[e, :, None])
        elif self.style == "buffer":
            buf = pool.new_zeros(E, S, D)
            for e, expert in enumerate(self.experts):
                buf[e, idx_Ek[e]] = (expert(pool[idx_Ek[e]]) * w_Ek[e, :, None]).to(buf.dtype)
            out = buf.sum(0)
        else:
            dispatch_SEk = F.one_hot(idx_Ek, S).permute(2, 0, 1).to(pool.dtype)
            x_EkD = torch.einsum("sek,sd->ekd", dispatch_SEk, pool)
            w1 = torch.stack([m.fc1.weight for m in self.experts])
            b1 = torch.stack([m.fc1.bias for m in self.experts])
            w2 = torch.stack([m.fc2.weight for m in self.experts])
            b2 = torch.stack([m.fc2.bias for m in self.experts])
            h = F.gelu(torch.baddbmm(b1[:, None], x_EkD, w1.transpose(1, 2)), approximate="tanh")
            y_EkD = torch.baddbmm(b2[:, None], h, w2.transpose(1, 2))
            out = torch.einsum("sek,ekd->sd", dispatch_SEk * w_Ek, y_EkD)
        return out.view(B, s, D)


NAIVE_STYLES = ("loop", "buffer", "onehot")


class AuthorsDynamicLoop(nn.Module):
    """Dynamic inference as the authors' public code runs it (restated in
    tests/test_official.py): k_e = #{s : sigmoid(prediction[s, e]) > tau_e}, then for each expert
    a ``topk`` of its score column, its FFN on those rows and a weighted add."""

    def __init__(self, dim: int, hidden: int, experts: int):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.predictor = CapacityPredictor(dim, experts)
        self.experts = nn.ModuleList(FeedForward(dim, hidden) for _ in range(experts))
        self.register_buffer("thresholds", torch.zeros(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = x.reshape(-1, x.shape[-1])
        scores = self.router(pool).softmax(-1)
        counts = (torch.sigmoid(self.predictor(pool)) > self.thresholds).sum(0).tolist()
        out = torch.zeros_like(pool)
        for e, (k, expert) in enumerate(zip(counts, self.experts)):
            if k:
                idx = scores[:, e].topk(k).indices
                out[idx] += scores[idx, e, None] * expert(pool[idx])
        return out.view_as(x)


class Dynamic(nn.Module):
    """Our diffmoe layer at inference in dynamic mode (Eq. 14)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, Routing("dynamic")).y



class ExpertsOnly(nn.Module):
    """Our stacked experts alone on pre-gathered (E, k, D) rows: no router, predictor, gather or
    combine. Separates what the GEMM shapes cost (inner dimension k = S/E in the weight
    gradients) from what routing costs."""

    def __init__(self, dim: int, hidden: int, experts: int):
        super().__init__()
        self.bank = build_ffn(MoEConfig(type="diffmoe", num_experts=experts), dim, hidden).experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E = self.bank.num_experts
        return self.bank.forward_equal(x.reshape(E, -1, x.shape[-1])).view_as(x)


class PredictorOnly(nn.Module):
    """The capacity predictor alone on the pool: what dynamic inference (Eq. 14) must compute
    for every token before any expert runs, about 1/8 of the dense FFN's FLOPs (D² against 8D²
    per token)."""

    def __init__(self, predictor: nn.Module):
        super().__init__()
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(x.reshape(-1, x.shape[-1]))


def build_layers(dim: int, experts: int, device: torch.device) -> dict[str, nn.Module]:
    hidden = 4 * dim
    layers: dict[str, nn.Module] = {"dense": FeedForward(dim, hidden)}
    for kind in ("diffmoe", "expert_choice", "token_choice"):
        layers[kind] = build_ffn(MoEConfig(type=kind, num_experts=experts), dim, hidden)
    layers["experts_only"] = ExpertsOnly(dim, hidden, experts)
    for style in NAIVE_STYLES:
        layers[f"naive_{style}"] = NaiveDiffMoE(dim, hidden, experts, style)
    return {k: v.to(device).train() for k, v in layers.items()}


def build_dynamic(dim: int, experts: int, x: torch.Tensor, capacity: float = 1.0
                  ) -> dict[str, nn.Module]:
    """Our diffmoe layer in dynamic mode and the authors' loop with its weights, each expert's
    threshold set so that it takes about S*C/E tokens of ``x``."""
    layer = build_ffn(MoEConfig(type="diffmoe", num_experts=experts), dim, 4 * dim)
    layer = layer.to(x.device).eval()
    with torch.no_grad():
        probs = torch.sigmoid(layer.predictor(x.reshape(-1, dim)).float())
        layer.thresholds_E.copy_(probs.quantile(1.0 - capacity / experts, dim=0))
    authors = AuthorsDynamicLoop(dim, 4 * dim, experts).to(x.device).eval()
    copy_weights(authors, layer)
    authors.thresholds.copy_(layer.thresholds_E)
    rows = {"diffmoe_dynamic": Dynamic(layer), "authors_dynamic_loop": authors,
            "predictor_only": PredictorOnly(layer.predictor)}
    with torch.no_grad():
        if not torch.allclose(rows["authors_dynamic_loop"](x), rows["diffmoe_dynamic"](x),
                              rtol=1e-4, atol=1e-5):
            raise RuntimeError("the authors' dynamic loop does not compute the diffmoe layer")
    return rows


def copy_weights(ref: nn.Module, ours: nn.Module) -> None:
    """Our diffmoe layer's router, predictor and experts into a reference built of nn.Linear."""
    bank = ours.experts
    with torch.no_grad():
        ref.router.weight.copy_(ours.router.weight_ED)
        ref.predictor.load_state_dict(ours.predictor.state_dict())
        for e, m in enumerate(ref.experts):
            m.fc1.weight.copy_(bank.w1_EDF[e].t())
            m.fc1.bias.copy_(bank.b1_EF[e])
            m.fc2.weight.copy_(bank.w2_EFD[e].t())
            m.fc2.bias.copy_(bank.b2_ED[e])


def import_revision(rev: str, into: Path) -> ModuleType:
    """``diffmoe.models.moe`` of git revision ``rev``, imported as package ``diffmoe_<rev>`` (its
    modules import each other relatively, so none of them reaches this checkout's)."""
    source = export_revision(rev, into) / "diffmoe"
    name = f"diffmoe_{rev}"
    spec = importlib.util.spec_from_file_location(name, source / "__init__.py",
                                                  submodule_search_locations=[str(source)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.models.moe")


def revision_rows(old: ModuleType, rev: str, ours: nn.Module, dynamic: nn.Module, dim: int,
                  experts: int, x: torch.Tensor) -> tuple[dict, dict]:
    """The training and dynamic rows of ``old``'s diffmoe layer, holding ``ours``'s weights and
    ``dynamic``'s thresholds; raises unless each computes what this checkout's does on ``x``."""
    config = old.MoEConfig(type="diffmoe", num_experts=experts)
    train = old.build_ffn(config, dim, 4 * dim).to(x.device)
    train.load_state_dict(ours.state_dict())
    infer = old.build_ffn(config, dim, 4 * dim).to(x.device).eval()
    infer.load_state_dict(dynamic.layer.state_dict())
    with torch.no_grad():
        pairs = [(train(x).y, ours(x).y),
                 (infer(x, old.Routing("dynamic")).y, dynamic(x))]
    for got, expected in pairs:
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"the diffmoe layer of {rev} does not compute this checkout's")
    return {f"diffmoe@{rev}": train.train()}, {f"diffmoe_dynamic@{rev}": Dynamic(infer)}


def check_references(layers: dict[str, nn.Module], dim: int, device: torch.device) -> None:
    """Give the naive references our diffmoe layer's weights and require the same output, so the
    comparison is between implementations of one computation."""
    ours = layers["diffmoe"]
    for style in NAIVE_STYLES:
        copy_weights(layers[f"naive_{style}"], ours)
    with torch.no_grad():
        x = torch.randn(2, 64, dim, device=device)
        expected = ours(x).y
        for style in NAIVE_STYLES:
            got = layers[f"naive_{style}"](x)
            if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"naive_{style} does not compute the diffmoe layer")


def output_of(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = layer(x)
    return out.y if hasattr(out, "y") else out


def bench_shape(name: str, repeats: int, warmup: int, device: torch.device,
                dtype: torch.dtype, only: Optional[list[str]] = None,
                against: Optional[tuple[str, ModuleType]] = None, chain: int = 1) -> list[dict]:
    """Rows of one shape; ``only``: these layers (and the dense FFN) instead of all;
    ``against``: (revision, its ``diffmoe.models.moe``) for the rows of that revision;
    ``chain``: forwards per timed inference region (the figures are per forward)."""
    cfg = SHAPES[name]
    layers = build_layers(cfg["dim"], cfg["experts"], device)
    check_references(layers, cfg["dim"], device)
    x = torch.randn(SAMPLES, TOKENS, cfg["dim"], device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def fwd(layer):
        def run():
            # As sampling runs its steps: one autocast region (which keeps its casts of
            # nn.Linear weights for the region) with the experts' weights cast once.
            with torch.no_grad(), autocast, cast_experts_once(layer, compute_dtype(x)):
                for _ in range(chain):
                    output_of(layer, x)
        return run

    def fwd_bwd(layer):
        xg = x.clone().requires_grad_(True)

        def run():
            # As in training (zero_grad(set_to_none=True)): gradients are assigned, not added.
            for param in layer.parameters():
                param.grad = None
            with autocast:
                y = output_of(layer, xg)
            y.float().square().mean().backward()
        return run

    inference = dict(layers, **build_dynamic(cfg["dim"], cfg["experts"], x))
    if only:
        layers = {k: v for k, v in layers.items() if k == "dense" or k in only}
        inference = {k: v for k, v in inference.items() if k == "dense" or k in only}
    if against:
        rev, old = against
        train, infer = revision_rows(old, rev, layers["diffmoe"], inference["diffmoe_dynamic"],
                                     cfg["dim"], cfg["experts"], x)
        layers.update(train)
        inference.update(train, **infer)
    faults: dict[str, float] = {}
    f = {k: seconds / chain for k, seconds in interleaved_medians(
        {k: fwd(v) for k, v in inference.items()}, repeats, warmup, device, faults).items()}
    fb = interleaved_medians({k: fwd_bwd(v) for k, v in layers.items()}, repeats, warmup, device)
    rows = []
    for k in inference:
        trained = k in layers
        rows.append({"shape": name, "layer": k, "fwd_ms": 1e3 * f[k],
                     "fwd_bwd_ms": 1e3 * fb[k] if trained else None,
                     "fwd_ratio": f[k] / f["dense"], "fwd_page_faults": faults[k],
                     "fwd_bwd_ratio": fb[k] / fb["dense"] if trained else None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--layers", nargs="+", help="only these rows (and dense), e.g. "
                   "diffmoe_dynamic authors_dynamic_loop")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    p.add_argument("--chain", type=int, default=1,
                   help="forwards per timed inference region, as sampling runs its steps in one "
                        "(bf16: autocast's and the experts' weight casts made once per region)")
    p.add_argument("--against", metavar="REV",
                   help="also time the diffmoe layer of this git revision (e.g. d646134)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_allocator_arg(p)
    args = p.parse_args()
    if args.against and args.layers and not {"diffmoe", "diffmoe_dynamic"} <= set(args.layers):
        p.error("--against compares with the diffmoe and diffmoe_dynamic rows: add them to "
                "--layers")
    malloc = allocator(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        against = (args.against, import_revision(args.against, Path(tmp))) if args.against \
            else None
        rows = [r for s in args.shapes for r in bench_shape(s, args.repeats, args.warmup, device,
                                                            dtype, args.layers, against,
                                                            args.chain)]
    result = {"benchmark": "moe_layer", "machine": machine(), "allocator": malloc,
              "dtype": args.dtype, "against": args.against, "chain": args.chain,
              "samples": SAMPLES, "tokens": TOKENS, "rows": rows}
    text = table(rows, ["shape", "layer", "fwd_ms", "fwd_bwd_ms", "fwd_ratio", "fwd_bwd_ratio",
                        "fwd_page_faults"])
    emit(result, text, args.json)


if __name__ == "__main__":
    main()
