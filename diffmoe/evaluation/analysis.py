"""``diffmoe analyze``: where the capacity predictor spends compute.

From one sampling run in the chosen inference mode: capacity per sampling step for each MoE layer,
the load of every expert, the capacity of the tokens of each class (and of the unconditional
half under guidance), and from extra runs C_avg_infer against the sampling batch size (the pool
the experts choose from, paper §4). No Inception is involved, so it is fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..capacity import CapacityMeter
from ..config import validate_sample
from ..errors import ConfigError
from ..fileio import write_json
from ..sample import generate_batches, parse_labels, recorded_settings, resolve_routing
from . import plots
from .evaluate import Evaluator

log = logging.getLogger(__name__)

ANALYSIS_JSON = "analysis.json"
# The figures, by their key in the result: each is written to ``<key>.png`` in the output folder.
FIGURES = ("capacity_vs_timestep", "expert_load", "capacity_by_class", "capacity_vs_batch_size")


def analysis_outputs(out_dir: str | Path) -> list[Path]:
    """Every file ``diffmoe analyze`` writes into ``out_dir``: the figures and the JSON."""
    return [Path(out_dir) / f"{name}.png" for name in FIGURES] + [Path(out_dir) / ANALYSIS_JSON]


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


def analyze(evaluator: Evaluator, out_dir: str | Path, options: AnalyzeOptions) -> dict:
    """One sampling run with the evaluator's settings, then one per sampling batch size; the
    figures and ``analysis.json`` go to ``out_dir``."""
    out_dir = Path(out_dir)
    model, s = evaluator.model, evaluator.sample
    routing = resolve_routing(model, s)
    if not model.moe_layers():
        raise ConfigError("this checkpoint has no MoE layers: there is no capacity to analyse")
    for b in options.batch_sizes:
        validate_sample(replace(s, batch_size=b))
        if b > options.num_per_batch_size:
            raise ConfigError(f"--batch-sizes {b} is larger than --num-per-batch-size "
                              f"{options.num_per_batch_size}, so no batch would be that large; "
                              f"drop it or raise --num-per-batch-size")
    labels = parse_labels(evaluator.options.labels, options.num, model.cfg.num_classes, s.seed)
    meter = CapacityMeter(track_experts=True, track_samples=True)
    by_class = _capacity_by_class(evaluator, labels, meter, options.progress)
    times, per_layer = _by_timestep(meter)
    load = torch.stack([torch.stack(f) for f in meter.per_expert]).mean(0).tolist()
    batch_curve = _capacity_by_batch_size(evaluator, options)
    png = dict(zip(FIGURES, analysis_outputs(out_dir)))
    figures = {
        "capacity_vs_timestep": plots.plot_capacity_vs_timestep(
            times, per_layer, png["capacity_vs_timestep"]),
        "expert_load": plots.plot_expert_load(load, png["expert_load"]),
        "capacity_by_class": plots.plot_capacity_by_class(
            list(by_class), list(by_class.values()), png["capacity_by_class"]),
        "capacity_vs_batch_size": plots.plot_capacity_vs_batch(
            [r["batch_size"] for r in batch_curve], [r["c_avg_infer"] for r in batch_curve],
            png["capacity_vs_batch_size"]),
    }
    result = {
        "checkpoint": str(evaluator.checkpoint), "step": evaluator.step,
        "settings": dict(recorded_settings(s, routing.mode), num=options.num,
                         labels=evaluator.options.labels),
        "c_avg_infer": meter.c_avg(),
        "capacity_per_timestep": [{"t": t, "per_layer": c} for t, c in zip(times, per_layer)],
        "expert_load": load, "capacity_by_class": by_class,
        "capacity_vs_batch_size": batch_curve,
        "figures": {k: str(v) for k, v in figures.items()},
    }
    write_json(out_dir / ANALYSIS_JSON, result)
    return result


def _capacity_by_class(evaluator: Evaluator, labels: torch.Tensor, meter: CapacityMeter,
                       progress: bool) -> dict[str, float]:
    """Sample ``labels`` into ``meter`` and average each class's per-sample capacity, with the
    unconditional half of guided batches as the class ``uncond``."""
    num_classes = evaluator.model.cfg.num_classes
    class_sum = torch.zeros(num_classes + 1)  # last entry: the unconditional (null) label
    class_n = torch.zeros(num_classes + 1)
    seen = 0
    for _, y in generate_batches(evaluator.model, evaluator.objective, labels, evaluator.sample,
                                 progress=progress, meter=meter):
        per_row = torch.stack(meter.per_sample[seen:]).mean(0)  # this batch's forwards
        seen = len(meter.per_sample)
        rows_label = y if per_row.shape[0] == y.shape[0] else torch.cat(
            [y, torch.full_like(y, num_classes)])
        class_sum.index_add_(0, rows_label, per_row)
        class_n.index_add_(0, rows_label, torch.ones_like(per_row))
    keep = class_n > 0
    names = [str(c) if c < num_classes else "uncond" for c in range(num_classes + 1)]
    return {names[c]: float(class_sum[c] / class_n[c]) for c in range(num_classes + 1)
            if keep[c]}


def _capacity_by_batch_size(evaluator: Evaluator, options: AnalyzeOptions) -> list[dict]:
    """C_avg_infer of ``num_per_batch_size`` samples at each sampling batch size."""
    s = evaluator.sample
    curve = []
    for b in options.batch_sizes:
        m = CapacityMeter()
        y = parse_labels(evaluator.options.labels, options.num_per_batch_size,
                         evaluator.model.cfg.num_classes, s.seed)
        for _ in generate_batches(evaluator.model, evaluator.objective, y,
                                  replace(s, batch_size=b), progress=False, meter=m):
            pass
        curve.append({"batch_size": b, "c_avg_infer": m.c_avg()})
        log.info("sampling batch %d: C_avg_infer %.3f", b, m.c_avg())
    return curve
