"""``diffmoe analyze``: where the capacity predictor spends compute.

From one sampling run in the chosen inference mode: capacity per sampling step for each MoE layer,
the load of every expert, the capacity of the tokens of each class (and of the unconditional
half under guidance), and from extra runs C_avg_infer against the sampling batch size (the pool
the experts choose from, paper §4). No Inception is involved, so it is fast.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..capacity import CapacityMeter
from ..diffusion import SamplerOptions
from ..errors import ConfigError
from ..sample import generate_batches, parse_labels, resolve_routing
from . import plots
from .evaluate import Evaluator, write_json

log = logging.getLogger(__name__)

@dataclass
class AnalyzeOptions:
    num: int = 100
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    num_per_batch_size: int = 32
    progress: bool = True


def _by_timestep(meter: CapacityMeter) -> tuple[list[float], list[list[float]]]:
    grouped: dict[float, list[torch.Tensor]] = {}
    for t, c in zip(meter.times, meter.per_layer):
        grouped.setdefault(round(t, 6), []).append(c)
    times = sorted(grouped)
    return times, [torch.stack(grouped[t]).mean(0).tolist() for t in times]


def analyze(evaluator: Evaluator, out_dir: str | Path, options: AnalyzeOptions,
            mode: Optional[str] = None) -> dict:
    out_dir = Path(out_dir)
    model, s = evaluator.model, evaluator.sample
    routing = resolve_routing(model, mode or s.mode, s.threshold)
    if not model.moe_layers():
        raise ConfigError("this checkpoint has no MoE layers: there is no capacity to analyse")
    for b in options.batch_sizes:
        if b <= 0:
            raise ConfigError(f"--batch-sizes: {b} must be a positive integer")
    num_classes = model.cfg.num_classes
    labels = parse_labels(evaluator.options.labels, options.num, num_classes, s.seed)
    meter = CapacityMeter(track_experts=True, track_samples=True)
    class_sum = torch.zeros(num_classes + 1)  # last entry: the unconditional (null) label
    class_n = torch.zeros(num_classes + 1)
    seen = 0
    sampler_options = SamplerOptions.from_settings(s)
    for _, y in generate_batches(model, evaluator.objective, labels, sampler=s.sampler,
                                 steps=s.steps, cfg_scale=s.cfg_scale, routing=routing,
                                 batch_size=s.batch_size, seed=s.seed,
                                 progress=options.progress, meter=meter,
                                 options=sampler_options):
        per_row = torch.stack(meter.per_sample[seen:]).mean(0)  # this batch's forwards
        seen = len(meter.per_sample)
        rows_label = y if per_row.shape[0] == y.shape[0] else torch.cat(
            [y, torch.full_like(y, num_classes)])
        class_sum.index_add_(0, rows_label, per_row)
        class_n.index_add_(0, rows_label, torch.ones_like(per_row))
    times, per_layer = _by_timestep(meter)
    load = torch.stack([torch.stack(f) for f in meter.per_expert]).mean(0).tolist()
    keep = class_n > 0
    names = [str(c) if c < num_classes else "uncond" for c in range(num_classes + 1)]
    by_class = {names[c]: float(class_sum[c] / class_n[c]) for c in range(num_classes + 1)
                if keep[c]}
    batch_curve = []
    for b in options.batch_sizes:
        m = CapacityMeter()
        y = parse_labels(evaluator.options.labels, options.num_per_batch_size, num_classes, s.seed)
        for _ in generate_batches(model, evaluator.objective, y, sampler=s.sampler,
                                  steps=s.steps, cfg_scale=s.cfg_scale, routing=routing,
                                  batch_size=b, seed=s.seed, progress=False, meter=m,
                                  options=sampler_options):
            pass
        batch_curve.append({"batch_size": b, "c_avg_infer": m.c_avg()})
        log.info("sampling batch %d: C_avg_infer %.3f", b, m.c_avg())
    figures = {
        "capacity_vs_timestep": plots.plot_capacity_vs_timestep(
            times, per_layer, out_dir / "capacity_vs_timestep.png"),
        "expert_load": plots.plot_expert_load(load, out_dir / "expert_load.png"),
        "capacity_by_class": plots.plot_capacity_by_class(
            list(by_class), list(by_class.values()), out_dir / "capacity_by_class.png"),
        "capacity_vs_batch_size": plots.plot_capacity_vs_batch(
            [r["batch_size"] for r in batch_curve], [r["c_avg_infer"] for r in batch_curve],
            out_dir / "capacity_vs_batch_size.png"),
    }
    result = {
        "checkpoint": str(evaluator.checkpoint), "step": evaluator.step,
        "settings": dict(dataclasses.asdict(s), mode=routing.mode, num=options.num,
                         labels=evaluator.options.labels),
        "c_avg_infer": meter.c_avg(),
        "capacity_per_timestep": [{"t": t, "per_layer": c} for t, c in zip(times, per_layer)],
        "expert_load": load, "capacity_by_class": by_class,
        "capacity_vs_batch_size": batch_curve,
        "figures": {k: str(v) for k, v in figures.items()},
    }
    write_json(result, out_dir / "analysis.json")
    return result
