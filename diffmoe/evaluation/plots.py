"""PNG figures for evaluation and analysis (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIG_DPI = 120


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)
    return path


def plot_sweep(rows: list[dict], path: str | Path, budget: float) -> Path:
    """FID against C_avg_infer, one point per threshold (annotated with gamma), dynamic and
    static as separate markers, the budget as a vertical line."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    th = sorted((r for r in rows if r["mode"] == "threshold"), key=lambda r: r["c_avg_infer"])
    ax.plot([r["c_avg_infer"] for r in th], [r["fid"] for r in th], "o-", color="tab:blue",
            label="constant threshold γ (Eq. 16)")
    for r in th:
        ax.annotate(f"γ={r['threshold']:g}", (r["c_avg_infer"], r["fid"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    markers = {"dynamic": ("*", "tab:red"), "static": ("s", "tab:green")}
    for r in rows:
        if r["mode"] in markers:
            m, c = markers[r["mode"]]
            ax.plot(r["c_avg_infer"], r["fid"], m, color=c, markersize=11, label=r["mode"])
    ax.axvline(budget, color="grey", linestyle="--", linewidth=1, label=f"budget C = {budget:g}")
    ax.set_xlabel("C_avg_infer (Eq. 15)")
    ax.set_ylabel("FID")
    ax.set_title("Threshold sweep: quality vs compute")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_capacity_vs_timestep(times: Sequence[float], per_layer: Sequence[Sequence[float]],
                              path: str | Path) -> Path:
    """One line per MoE layer plus their mean; t = 0 is noise, t = 1 data."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    layers = list(zip(*per_layer))
    for i, series in enumerate(layers):
        ax.plot(times, series, linewidth=1, alpha=0.8, label=f"MoE layer {i}")
    mean = [sum(c) / len(c) for c in per_layer]
    ax.plot(times, mean, color="black", linewidth=2.2, label="mean (Eq. 9)")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("t (0 = noise, 1 = data)")
    ax.set_ylabel("capacity C")
    ax.set_title("Capacity per sampling step")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_expert_load(load: Sequence[Sequence[float]], path: str | Path) -> Path:
    """Heat map of C_e (Eq. 8), MoE layers × experts, averaged over the sampling forwards."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(load[0]) + 2), 0.5 * len(load) + 2))
    im = ax.imshow(load, cmap="viridis", aspect="auto")
    for i, row in enumerate(load):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(len(load[0])))
    ax.set_yticks(range(len(load)))
    ax.set_title("Per-expert load C_e (1 = fair share)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_capacity_by_class(names: Sequence[str], values: Sequence[float],
                           path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), names)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("class")
    ax.set_ylabel("capacity of its tokens")
    ax.set_title("Capacity by class")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_capacity_vs_batch(batch_sizes: Sequence[int], c_avg: Sequence[float],
                           path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(batch_sizes, c_avg, "o-", color="tab:purple")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("sampling batch size (samples sharing one token pool)")
    ax.set_ylabel("C_avg_infer")
    ax.set_title("Inference capacity vs sampling batch size")
    ax.grid(alpha=0.3)
    return _save(fig, path)
