"""How long a 2-process torchrun job takes to end after one rank is SIGKILLed or hangs, and how
long the resume takes. The figures in docs/reliability.md come from this script:

    .venv/bin/python benchmarks/fault_timing.py [--repeats 3]

It runs the same jobs as tests/test_ddp.py (tiny digits config, gloo, OMP_NUM_THREADS=1), with
the faults of tests/fault_runner.py; the time of the fault is written by the dying or hanging
rank itself, so "fault -> exit" is measured from the fault, not from the job's start.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

import test_ddp  # noqa: E402  (the tests' torchrun helpers and settings)


def fault_to_exit(run_dir: Path, faults: str, **config) -> tuple[int, float, float, list[str]]:
    """(torchrun's exit status, its wall time, seconds from the fault to its exit, error lines)"""
    stamp = run_dir.with_suffix(".fault-time")
    os.environ["DIFFMOE_FAULT_TIME"] = str(stamp)
    try:
        proc, wall = test_ddp.train_cli(run_dir, faults, **config)
        ended = time.time()
    finally:
        del os.environ["DIFFMOE_FAULT_TIME"]
    return (proc.returncode, wall, ended - float(stamp.read_text()),
            test_ddp.error_lines(proc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fault_timing-"))
    for i in range(args.repeats):
        for name, faults, config in [
                ("kill", f"{test_ddp.NAN},kill:5:1", {}),
                ("hang", "hang:3:1", {"train.dist_timeout_s": test_ddp.HANG_TIMEOUT_S})]:
            run_dir = root / f"{name}{i}"
            rc, wall, after, errors = fault_to_exit(run_dir, faults, **config)
            print(f"{name}: exit {rc}, torchrun wall {wall:.1f} s, fault -> exit {after:.2f} s")
            for line in errors:
                print("   ", line.replace(str(root), "<tmp>"))
        proc, wall = test_ddp.train_cli(root / f"kill{i}", test_ddp.NAN, "--resume")
        print(f"resume: exit {proc.returncode}, torchrun wall {wall:.1f} s")


if __name__ == "__main__":
    main()
