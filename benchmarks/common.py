"""Timing helpers shared by the benchmark scripts: interleaved runs and medians, so that every
ratio compares measurements taken side by side in one process."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Optional

import torch

Task = Callable[[], None]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# glibc hands freed blocks above its mmap and trim thresholds back to the kernel, and it moves
# those thresholds as it goes, so a task that allocates tens of MB again pays a page fault per 4
# KiB page, or not, depending on which tasks ran before it in the same process: in moe_layer.py
# the dynamic DiffMoE layer paid about 6,100 faults a call after the naive rows and none alone.
# Fixed thresholds keep every block below 32 MiB (glibc's largest mmap threshold) in the heap,
# so the tasks compared run on pages already mapped.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30


def steady_allocator() -> str:
    """Fix glibc's malloc thresholds for this process (see above); returns the allocator setting
    to record with the results ("glibc, fixed thresholds", or "system" where there is no glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        fixed = (libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
                 and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)
    except (OSError, AttributeError):
        fixed = False
    return "glibc, fixed thresholds" if fixed else "system"


def page_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved_medians(tasks: dict[str, Task], repeats: int, warmup: int,
                        device: torch.device, faults: Optional[dict[str, float]] = None
                        ) -> dict[str, float]:
    """Run every task ``warmup`` times, then ``repeats`` rounds in which each task runs once (in
    the same order), and return each task's median seconds. ``faults``: filled with each task's
    minor page faults per run."""
    for _ in range(warmup):
        for fn in tasks.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in tasks}
    counted = {name: 0 for name in tasks}
    for _ in range(repeats):
        for name, fn in tasks.items():
            sync(device)
            before = page_faults()
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            counted[name] += page_faults() - before
    if faults is not None:
        faults.update({name: n / repeats for name, n in counted.items()})
    return {name: statistics.median(ts) for name, ts in times.items()}


def add_allocator_arg(parser) -> None:
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's adaptive malloc thresholds (default: fixed ones, so "
                             "that page faults do not depend on which task ran before)")


def allocator(args) -> str:
    """The allocator setting of ``--system-malloc``, applied; recorded with the results."""
    return "system" if args.system_malloc else steady_allocator()


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "cpu_bf16": bool(torch.backends.mkldnn.is_available()
                             and torch.ops.mkldnn._is_mkldnn_bf16_supported())}
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
