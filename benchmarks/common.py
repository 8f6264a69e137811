"""Timing helpers shared by the benchmark scripts: interleaved runs and medians, so that every
ratio compares measurements taken side by side in one process."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from typing import Callable

import torch

Task = Callable[[], None]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(tasks: dict[str, Task], repeats: int, warmup: int,
                        device: torch.device) -> dict[str, float]:
    """Run every task ``warmup`` times, then ``repeats`` rounds in which each task runs once (in
    the same order), and return each task's median seconds."""
    for _ in range(warmup):
        for fn in tasks.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, fn in tasks.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    head = "  ".join(c.ljust(widths[c]) for c in columns)
    lines = [head, "  ".join("-" * widths[c] for c in columns)]
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def emit(result: dict, text: str, as_json: bool) -> None:
    sys.stdout.write((json.dumps(result) if as_json else text) + "\n")
