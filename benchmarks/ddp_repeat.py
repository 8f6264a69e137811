"""Repeat check of the DDP fault tests (tests/test_ddp.py: the reference run, a killed rank and
its exact resume, a rank hung in a step and one hung at the end, a killed launcher), run N times
in a row, each in its own pytest process. Not part of ``make test``.

Every run is classified as

* ``pass``: pytest exited 0;
* ``hang``: a job did not end (tests/jobs.py raised ``JobHung`` or ``JobLeftProcesses``, which
  print the stacks of the stuck processes), or the pytest process itself outlived ``--timeout``;
* ``fail``: any other failure.

The counts, each run's wall time and, for a run that did not pass, the tail of its output are
printed and written as JSON.

    .venv/bin/python benchmarks/ddp_repeat.py --runs 20 --out ddp_repeat.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# How pytest names the harness's exceptions in a failure report (tests/jobs.py).
HANG_MARKERS = ("jobs.JobHung", "jobs.JobLeftProcesses")


def one_run(timeout_s: float, select: str) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_ddp.py"), "-k", select]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return {"result": "hang", "seconds": round(time.perf_counter() - start, 1),
                "tail": f"pytest outlived {timeout_s:g} s\n{out[-2000:]}"}
    seconds = round(time.perf_counter() - start, 1)
    output = proc.stdout + proc.stderr
    summary = next((line for line in reversed(output.splitlines()) if " in " in line), "")
    if proc.returncode == 0:
        return {"result": "pass", "seconds": seconds, "summary": summary}
    result = "hang" if any(m in output for m in HANG_MARKERS) else "fail"
    return {"result": result, "seconds": seconds, "summary": summary, "tail": output[-4000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds one pytest run may take before it counts as a hang")
    parser.add_argument("-k", dest="select", default="not a_hung_job_fails",
                        help="pytest -k expression (default: the DDP fault tests)")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        run = one_run(args.timeout, args.select)
        runs.append(run)
        print(f"run {i + 1}/{args.runs}: {run['result']} in {run['seconds']} s "
              f"({run.get('summary', '')})", flush=True)
        if run["result"] != "pass":
            print(run["tail"], flush=True)
    counts = Counter(r["result"] for r in runs)
    report = {"runs": args.runs, "pass": counts["pass"], "hang": counts["hang"],
              "fail": counts["fail"], "seconds": [r["seconds"] for r in runs],
              "problems": [r for r in runs if r["result"] != "pass"]}
    print(f"{report['pass']} of {args.runs} clean, {report['hang']} hung, {report['fail']} "
          f"failed; {sum(report['seconds']):.0f} s in all", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    sys.exit(0 if report["pass"] == args.runs else 1)


if __name__ == "__main__":
    main()
