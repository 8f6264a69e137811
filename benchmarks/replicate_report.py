"""Tables and figures of benchmarks/replicate.py, from the finished rows in OUT/rows: mean and
standard error over seeds (SE = sample standard deviation / √n; none with one seed), paired
differences against Dense-1x (same seed: same data order and training noise), the interval search,
the sampling-batch study, routing stability and the held-out loss curves. Writes
OUT/report/summary.json, OUT/report/tables.md and PNGs beside them."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffmoe.fileio import atomic_write_text, write_json  # noqa: E402

BASELINE = "dense-1x"
METRICS = ("fid", "heldout_loss", "c_avg_infer", "class_consistency", "kid", "precision",
           "recall", "activated_params", "images_per_second")


def mean_se(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    se = (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None)
    return {"mean": mean, "se": se, "n": n, "values": values}


def load_rows(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))}


def fmt(stat: dict | None, digits: int = 2) -> str:
    if stat is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['se']:.{digits}f}" if stat["se"] is not None else "")


def eval_id(model: str, seed: int | str, mode: str, at: int | None = None) -> str:
    """The id of an evaluation row; ``seed`` may be the format field ``{seed}`` (rows paired
    seed by seed), ``at`` the training step of the checkpoint (None: the last)."""
    return f"eval-{model}-s{seed}-{mode}" + ("" if at is None else f"-at{at}")


def comparison_table(done: dict, rows: list, models: dict) -> list[dict]:
    """One line per (model, mode, checkpoint step) evaluated: metrics over seeds, training cost,
    and the paired difference against Dense-1x at the same step."""
    groups = defaultdict(list)
    for r in rows:
        if r.kind == "eval" and r.id in done:
            groups[(r.model, r.mode, r.at)].append(done[r.id])
    lines = []
    for (model, mode, at), results in groups.items():
        base = {d["seed"]: d for d in groups.get((BASELINE, "static", at), [])}
        trains = [done[f"train-{model}-s{d['seed']}"] for d in results]
        line = {"model": model, "label": models[model].label, "mode": mode, "at": at,
                "seeds": sorted(d["seed"] for d in results),
                "total_params": results[0]["total_params"],
                "train_seconds": mean_se([t["train_seconds"] for t in trains]),
                "train_cpu_seconds": mean_se([t["cpu_seconds"] for t in trains])}
        line.update({m: mean_se([d[m] for d in results]) for m in METRICS
                     if all(d.get(m) is not None for d in results)})
        for m in ("fid", "heldout_loss"):
            paired = [d[m] - base[d["seed"]][m] for d in results if d["seed"] in base]
            line[f"{m}_vs_dense"] = mean_se(paired) if paired and model != BASELINE else None
        lines.append(line)
    return lines


def render_comparison(lines: list[dict]) -> str:
    """The comparison table; with a ``step`` column where rows were evaluated at several
    checkpoints (and the training time then that of the whole run)."""
    steps = any(ln.get("at") is not None for ln in lines)
    head = ("| model | mode | " + ("step | " if steps else "") +
            "seeds | params (total) | activated (Eq. 40) | C_avg | FID | "
            "Δ FID vs Dense-1x | held-out loss | Δ loss vs Dense-1x | class consistency | "
            "train s (CPU s) | sample img/s |")
    out = [head, "|" + "---|" * (14 if steps else 13)]
    for ln in sorted(lines, key=lambda ln: ln.get("at") or 0) if steps else lines:
        out.append(
            f"| {ln['label']} | {ln['mode']} | " + (f"{ln['at']} | " if steps else "") +
            f"{len(ln['seeds'])} | "
            f"{ln['total_params'] / 1e6:.2f}M | {ln['activated_params']['mean'] / 1e6:.2f}M | "
            f"{fmt(ln['c_avg_infer'], 3)} | {fmt(ln['fid'])} | {fmt(ln['fid_vs_dense'])} | "
            f"{fmt(ln['heldout_loss'], 4)} | {fmt(ln['heldout_loss_vs_dense'], 4)} | "
            f"{fmt(ln['class_consistency'], 3)} | {fmt(ln['train_seconds'], 0)} "
            f"({fmt(ln['train_cpu_seconds'], 0)}) | "
            f"{fmt(ln['images_per_second'], 0)} |")
    return "\n".join(out)


PAIRED = (("diffmoe-e8", "static", "dynamic"), ("diffmoe-e8", "predictor", "dynamic"),
          ("ec-e8", "dynamic", "static"))
PAIRED_METRICS = ("c_avg_infer", "fid", "heldout_loss", "class_consistency")


def seed_differences(done: dict, seeds: list[int], first: str, second: str) -> dict | None:
    """The per-seed differences of :data:`PAIRED_METRICS` between two rows (``first`` minus
    ``second``, row ids with a ``{seed}`` field), mean and SE over the seeds where both are done;
    None where there are none."""
    pairs = [(done.get(first.format(seed=s)), done.get(second.format(seed=s))) for s in seeds]
    pairs = [(x, y) for x, y in pairs if x and y]
    if not pairs:
        return None
    return {"seeds": len(pairs),
            **{m: mean_se([x[m] - y[m] for x, y in pairs]) for m in PAIRED_METRICS}}


def eval_seeds(rows: list) -> list[int]:
    return sorted({r.seed for r in rows if r.kind == "eval"})


def paired_modes(done: dict, rows: list) -> list[dict]:
    """Two inference modes of the same checkpoints, seed by seed: first minus second."""
    lines = []
    for model, a, b in PAIRED:
        diff = seed_differences(done, eval_seeds(rows), eval_id(model, "{seed}", a),
                                eval_id(model, "{seed}", b))
        if diff:
            lines.append({"model": model, "modes": f"{a} - {b}", **diff})
    return lines


MODEL_PAIRS = (("diffmoe-e8", "dynamic", "tc-e8", "static"),
               ("diffmoe-e8", "dynamic", "ec-e8", "static"),
               ("diffmoe-e8", "dynamic", "dense-3x", "static"),
               ("diffmoe-e4", "dynamic", "diffmoe-e8", "dynamic"),
               ("diffmoe-e4", "dynamic", "tc-e8", "static"),
               ("diffmoe-e4", "dynamic", "ec-e8", "static"),
               ("diffmoe-e4", "dynamic", "dense-3x", "static"))


def paired_models(done: dict, rows: list, models: dict) -> list[dict]:
    """Two models compared seed by seed (same data order, same noise): first minus second."""
    lines = []
    for a, mode_a, b, mode_b in MODEL_PAIRS:
        diff = seed_differences(done, eval_seeds(rows), eval_id(a, "{seed}", mode_a),
                                eval_id(b, "{seed}", mode_b))
        if diff and a in models and b in models:
            lines.append({"model": f"{models[a].label} ({mode_a})",
                          "modes": f"- {models[b].label} ({mode_b})", **diff})
    return lines


# Issue 37's differences, followed over training: (model, mode) minus (model, mode).
TRAINING_PAIRS = (("diffmoe-e8", "dynamic", "dense-1x", "static"),
                  ("diffmoe-e8", "dynamic", "ec-e8", "static"),
                  ("diffmoe-e8", "dynamic", "dense-3x", "static"),
                  ("diffmoe-e8", "static", "diffmoe-e8", "dynamic"))


def pair_label(models: dict, a: str, mode_a: str, b: str, mode_b: str) -> str:
    if a == b:
        return f"{models[a].label}: {mode_a} - {mode_b}"
    return f"{models[a].label} ({mode_a}) - {models[b].label} ({mode_b})"


def differences_over_training(done: dict, rows: list, models: dict) -> list[dict]:
    """For each pair of :data:`TRAINING_PAIRS` and each checkpoint step evaluated: the
    seed-by-seed differences of the sampling metrics."""
    steps = sorted({r.at for r in rows if r.kind == "eval" and r.at is not None})
    lines = []
    for a, mode_a, b, mode_b in TRAINING_PAIRS:
        if a not in models or b not in models:
            continue
        for at in steps:
            diff = seed_differences(done, eval_seeds(rows), eval_id(a, "{seed}", mode_a, at),
                                    eval_id(b, "{seed}", mode_b, at))
            if diff:
                lines.append({"pair": pair_label(models, a, mode_a, b, mode_b), "step": at,
                              **diff})
    return lines


def curve_differences(done: dict, rows: list, models: dict) -> list[dict]:
    """The held-out loss along training (the training rows' curves, each model in its first
    mode), model minus model seed by seed at every point, for the pairs of
    :data:`TRAINING_PAIRS` between two models."""
    lines = []
    for a, mode_a, b, mode_b in TRAINING_PAIRS:
        if a == b or a not in models or b not in models:
            continue
        pairs = [(done.get(f"train-{a}-s{s}"), done.get(f"train-{b}-s{s}"))
                 for s in sorted({r.seed for r in rows if r.kind == "train"})]
        pairs = [(x["curve"], y["curve"]) for x, y in pairs if x and y]
        if not pairs:
            continue
        steps = [p["step"] for p in pairs[0][0]]
        lines.append({"pair": pair_label(models, a, mode_a, b, mode_b), "seeds": len(pairs),
                      "steps": steps,
                      "loss": [mean_se([x[i]["loss"] - y[i]["loss"] for x, y in pairs])
                               for i in range(len(steps))]})
    return lines


def render_over_training(lines: list[dict]) -> str:
    return render_differences(lines, (("difference", "pair"), ("step", "step")))


def render_curve_differences(lines: list[dict]) -> str:
    if not lines:
        return ""
    steps = lines[0]["steps"]
    out = ["| difference | seeds | " + " | ".join(str(s) for s in steps) + " |",
           "|---|---|" + "---|" * len(steps)]
    for ln in lines:
        out.append(f"| {ln['pair']} | {ln['seeds']} | "
                   + " | ".join(fmt(v, 4) for v in ln["loss"]) + " |")
    return "\n".join(out)


def band(ax, xs: list, stats: list[dict], label: str) -> None:
    """Means with a ± SE band (none with one seed)."""
    mean = [st["mean"] for st in stats]
    se = [st["se"] or 0.0 for st in stats]
    ax.plot(xs, mean, "o-", markersize=3, label=label)
    ax.fill_between(xs, [m - e for m, e in zip(mean, se)], [m + e for m, e in zip(mean, se)],
                    alpha=0.2)


def plot_over_training(lines: list[dict], curves: list[dict], path: Path) -> Path:
    """Four panels against the training step: Δ FID, Δ class consistency and Δ held-out loss of
    the sampling rows, and Δ held-out loss along the training curves; each difference's mean
    over seeds with its ± SE band, zero marked."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = (("fid", "Δ FID (lower: first is better)"),
              ("class_consistency", "Δ class consistency (higher: first is better)"),
              ("heldout_loss", "Δ held-out loss, sampling rows' mode"))
    pairs = list(dict.fromkeys(ln["pair"] for ln in lines))
    for ax, (metric, title) in zip(axes.flat, panels):
        for pair in pairs:
            mine = [ln for ln in lines if ln["pair"] == pair]
            band(ax, [ln["step"] for ln in mine], [ln[metric] for ln in mine], pair)
        ax.set_title(title, fontsize=9)
    ax = axes.flat[3]
    for ln in curves:
        band(ax, ln["steps"], ln["loss"], ln["pair"])
    ax.set_title("Δ held-out loss along training (EMA weights)", fontsize=9)
    for ax in axes.flat:
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("training step")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Paired differences over training (mean ± SE over seeds)")
    return save(fig, path)


def stability_summary(result: dict) -> list[dict]:
    """Per mode and MoE layer: the share of tokens whose experts changed between consecutive
    steps, averaged over the noisier and the cleaner half of the trajectory and over all steps,
    and the share of tokens no expert processed."""
    lines = []
    for mode, r in result["modes"].items():
        times = r["times"]
        for layer in range(len(r["changed"][0])):
            changed = [c[layer] for c in r["changed"]]
            early = [c for c, t in zip(changed, times) if t < 0.5]
            late = [c for c, t in zip(changed, times) if t >= 0.5]
            lines.append({"mode": mode, "layer": layer + 1,
                          "changed_t_below_half": sum(early) / max(1, len(early)),
                          "changed_t_above_half": sum(late) / max(1, len(late)),
                          "changed": sum(changed) / len(changed),
                          "unrouted": sum(u[layer] for u in r["unrouted"]) / len(times)})
    return lines


def render_stability(lines: list[dict]) -> str:
    out = ["| mode | MoE layer | changed, t < 0.5 | changed, t ≥ 0.5 | changed, all steps | "
           "no expert |", "|---|---|---|---|---|---|"]
    for ln in lines:
        out.append(f"| {ln['mode']} | {ln['layer']} | {ln['changed_t_below_half']:.3f} | "
                   f"{ln['changed_t_above_half']:.3f} | {ln['changed']:.3f} | "
                   f"{ln['unrouted']:.3f} |")
    return "\n".join(out)


def render_paired(lines: list[dict]) -> str:
    return render_differences(lines, (("model", "model"), ("difference", "modes")))


def render_differences(lines: list[dict], first: tuple[tuple[str, str], ...]) -> str:
    """Paired differences (:func:`seed_differences`) as a table, after the columns ``first``
    ((header, key) of each line)."""
    out = ["| " + " | ".join(h for h, _ in first) + " | seeds | Δ C_avg | Δ FID | "
           "Δ held-out loss | Δ class consistency |", "|" + "---|" * (len(first) + 5)]
    for ln in lines:
        out.append("| " + " | ".join(str(ln[k]) for _, k in first) +
                   f" | {ln['seeds']} | {fmt(ln['c_avg_infer'], 3)} | {fmt(ln['fid'])} | "
                   f"{fmt(ln['heldout_loss'], 4)} | {fmt(ln['class_consistency'], 3)} |")
    return "\n".join(out)


def render_sampling_rows(title: str, results: list[dict], key: str) -> str:
    out = [f"| {title} | C_avg | FID | KID | class consistency | held-out loss | img/s |",
           "|---|---|---|---|---|---|---|"]
    for d in results:
        kid = "-" if d["kid"] is None else f"{d['kid']:.4f}"
        out.append(f"| {d[key]} | {d['c_avg_infer']:.3f} | {d['fid']:.2f} | {kid} | "
                   f"{d['class_consistency']:.3f} | {d['heldout_loss']:.4f} | "
                   f"{d['images_per_second']:.1f} |")
    return "\n".join(out)


def sweep_results(done: dict, rows: list) -> list[dict]:
    """The interval search's rows with the analysed checkpoint's dynamic and static rows."""
    sweep = [dict(done[r.id], setting=f"γ = {r.gamma:g}") for r in rows
             if r.kind == "sweep" and r.id in done]
    if not sweep:
        return []
    first = next(r for r in rows if r.kind == "sweep")
    extra = [dict(done[r.id], setting=r.mode) for r in rows
             if r.kind == "eval" and r.model == first.model and r.seed == first.seed
             and r.mode in ("dynamic", "static") and r.id in done]
    return sorted(sweep, key=lambda d: d["c_avg_infer"]) + extra


def batch_results(done: dict, rows: list) -> list[dict]:
    """Every (mode, batch) of the analysed checkpoint, its batch-64 rows included."""
    batch = [r for r in rows if r.kind == "batch"]
    if not batch:
        return []
    model, seed = batch[0].model, batch[0].seed
    found = [dict(done[r.id], setting=f"{r.mode}, batch {done[r.id]['batch']}") for r in rows
             if r.id in done and r.model == model and r.seed == seed
             and r.kind in ("batch", "eval") and r.mode in ("dynamic", "static", "predictor")]
    return sorted(found, key=lambda d: (d["mode"], d["batch"]))


def plot_curves(done: dict, rows: list, models: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, m in models.items():
        curves = [done[r.id]["curve"] for r in rows
                  if r.kind == "train" and r.model == name and r.id in done]
        if not curves:
            continue
        steps = [p["step"] for p in curves[0]]
        stats = [mean_se([c[i]["loss"] for c in curves]) for i in range(len(steps))]
        mean = [s["mean"] for s in stats]
        se = [s["se"] or 0.0 for s in stats]
        ax.plot(steps, mean, "o-", markersize=3, label=f"{m.label} ({len(curves)} seeds)")
        ax.fill_between(steps, [a - b for a, b in zip(mean, se)],
                        [a + b for a, b in zip(mean, se)], alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out flow-matching loss (EMA weights)")
    ax.set_title("Held-out loss along training (mean ± SE over seeds)")
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_sweep(results: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sweep = [d for d in results if d["mode"] == "threshold"]
    for ax, key, name in ((axes[0], "fid", "FID"), (axes[1], "heldout_loss", "held-out loss")):
        ax.plot([d["c_avg_infer"] for d in sweep], [d[key] for d in sweep], "o-",
                label="constant threshold γ (Eq. 16)")
        for d in sweep:
            ax.annotate(f"γ={d['gamma']:g}", (d["c_avg_infer"], d[key]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
        for d in results:
            if d["mode"] in ("dynamic", "static"):
                ax.plot(d["c_avg_infer"], d[key], "*" if d["mode"] == "dynamic" else "s",
                        markersize=10, label=d["mode"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("C_avg_infer (Eq. 15)")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    fig.suptitle("Interval search (Table 10) on the DiffMoE-E8 checkpoint, seed 0")
    return save(fig, path)


def plot_batch(results: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for mode in ("dynamic", "static", "predictor"):
        ds = [d for d in results if d["mode"] == mode]
        for ax, key in zip(axes, ("fid", "c_avg_infer", "class_consistency")):
            ax.plot([d["batch"] for d in ds], [d[key] for d in ds], "o-", label=mode)
    for ax, name in zip(axes, ("FID", "C_avg_infer", "class consistency")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling batch")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    fig.suptitle("The sampling batch (Table 13): DiffMoE-E8, seed 0, same noise per image")
    return save(fig, path)


def plot_stability(result: dict, path: Path) -> Path:
    modes = result["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.8), sharey=True)
    for ax, (mode, r) in zip(axes, modes.items()):
        layers = len(r["changed"][0])
        for layer in range(layers):
            ax.plot(r["times"], [c[layer] for c in r["changed"]], "o-", markersize=3,
                    label=f"MoE layer {layer + 1}")
        ax.set_title(mode)
        ax.set_xlabel("t (0 noise → 1 data)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("share of tokens whose experts changed")
    fig.suptitle("Routing stability between consecutive sampling steps (DiffMoE-E8, seed 0)")
    return save(fig, path)


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def totals(done: dict) -> dict:
    return {"rows": len(done),
            "wall_seconds": sum(d.get("seconds", d.get("train_seconds", 0.0))
                                + d.get("heldout_seconds", 0.0) for d in done.values()),
            "cpu_seconds": sum(d.get("cpu_seconds", 0.0) for d in done.values())}


def write_report(out: Path, rows: list, scale, models: dict, machine: dict) -> dict:
    """The report of the finished rows of ``rows`` (``models``: replicate.models)."""
    done = load_rows(out)
    report = out / "report"
    lines = comparison_table(done, rows, models)
    sweep, batch = sweep_results(done, rows), batch_results(done, rows)
    stability = next((done[r.id] for r in rows if r.kind == "stability" and r.id in done), None)
    figures = {}
    if any(r.kind == "train" and r.id in done for r in rows):
        figures["loss_curves"] = str(plot_curves(done, rows, models, report / "loss_curves.png"))
    if sweep:
        figures["interval_search"] = str(plot_sweep(sweep, report / "interval_search.png"))
    if batch:
        figures["sampling_batch"] = str(plot_batch(batch, report / "sampling_batch.png"))
    if stability:
        figures["stability"] = str(plot_stability(stability, report / "stability.png"))
    paired = paired_modes(done, rows)
    between = paired_models(done, rows, models)
    steadiness = stability_summary(stability) if stability else []
    over_training = differences_over_training(done, rows, models)
    curves = curve_differences(done, rows, models)
    if over_training or curves:
        figures["over_training"] = str(plot_over_training(over_training, curves,
                                                          report / "over_training.png"))
    sections = [("Comparisons (Tables 3 and 4)", lines, render_comparison),
                ("Differences over training (paired by seed)", over_training,
                 render_over_training),
                ("Held-out loss along training, differences (paired by seed)", curves,
                 render_curve_differences),
                ("Inference modes of the same checkpoints (paired by seed)", paired,
                 render_paired),
                ("Models against each other (paired by seed)", between, render_paired),
                ("Interval search (Table 10)", sweep,
                 lambda r: render_sampling_rows("setting", r, "setting")),
                ("Sampling batch (Table 13)", batch,
                 lambda r: render_sampling_rows("setting", r, "setting")),
                ("Routing stability along the trajectory", steadiness, render_stability)]
    # A study measures some of these only (the long one: no sweep, no batch rows): the others
    # are left out rather than shown as empty tables.
    text = [f"## {title}\n\n{render(results)}" for title, results, render in sections
            if results] or ["No row is finished yet."]
    atomic_write_text(report / "tables.md", "\n\n".join(text) + "\n")
    summary = {"scale": scale.name, "settings": {k: v for k, v in vars(scale).items()},
               "machine": machine, "done": totals(done), "rows_planned": len(rows),
               "comparison": lines, "paired_modes": paired, "paired_models": between,
               "interval_search": sweep, "stability_summary": steadiness,
               "over_training": over_training, "curve_differences": curves,
               "sampling_batch": batch,
               "stability": stability, "figures": figures}
    write_json(report / "summary.json", summary)
    return summary
