"""Stress loop of end-of-run teardowns under 2-process torchrun (gloo, CPU): reproduces the
GIL deadlock of destroying a gloo process group from a GIL-holding destructor, and shows that the
order the library uses does not deadlock.

Each iteration is one run's end in miniature: a gloo group, a DDP model on it with one backward,
an ``all_gather_object`` (Python tensors in gloo's work items, as ``RunDirectory.save`` gathers RNG
states), a barrier, then the group's end in one of two orders:

* ``unsafe`` (the library before the fix): ``destroy_process_group``, then free the DDP wrapper.
  Its ``Reducer`` then drops the group's last reference with the GIL held, and
  ``~ProcessGroupGloo`` joins a worker that may still be destroying the all-gather's work item,
  waiting for the GIL.
* ``library`` (``Trainer.close`` then ``diffmoe.distributed.destroy_group``): free the DDP
  wrapper first, then destroy the group, whose last reference is then a Python one that releases
  the GIL while gloo's threads are joined.

An iteration takes milliseconds (the library order's ``gc.collect`` about a tenth of a second);
a rank whose iteration has not finished within ``--stall`` seconds is stuck: its threads' stacks
are printed (faulthandler), it exits, and the job counts as a hang, with the number of iterations
done before. For native stacks of a stuck rank run ``py-spy dump --native --pid PID`` while it
hangs (raise ``--stall`` to have the time).

    .venv/bin/python benchmarks/teardown_stress.py                # both orders, side by side
    .venv/bin/python benchmarks/teardown_stress.py --orders library --iterations 5000
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ("unsafe", "library")


def worker(order: str, iterations: int, stall_s: float, progress: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from diffmoe import distributed

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    start = time.perf_counter()
    for i in range(iterations):
        faulthandler.dump_traceback_later(stall_s, exit=True)  # this iteration's deadline
        group = dist.new_group(backend="gloo")
        ddp = DistributedDataParallel(torch.nn.Linear(4, 4), process_group=group,
                                      broadcast_buffers=False)
        ddp(torch.randn(2, 4)).sum().backward()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"iteration": i, "state": torch.randn(3)}, group=group)
        dist.barrier(group=group)
        if order == "unsafe":
            dist.destroy_process_group(group)
            del group
            del ddp  # the Reducer drops the group's last reference, GIL held
        else:
            del ddp
            distributed.destroy_group(group)  # under a deadline of its own, which replaces ours
            del group
        if rank == 0:
            progress.write_text(str(i + 1))
    faulthandler.cancel_dump_traceback_later()
    if rank == 0:
        print(json.dumps({"seconds": round(time.perf_counter() - start, 1)}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def launch(order: str, iterations: int, stall_s: float) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        progress = Path(tmp) / "done"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--worker",
               order, "--iterations", str(iterations), "--stall", str(stall_s),
               "--progress", str(progress)]
        start = time.perf_counter()
        # A stuck rank exits at its deadline and torchrun then ends the job, so this returns.
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        done = int(progress.read_text()) if progress.exists() else 0
    # Each stuck rank's innermost line of worker(): where its main thread waits.
    stuck_at = [line.strip().split(", ")[-1] for line in proc.stderr.splitlines()
                if "teardown_stress.py" in line and line.strip().endswith("in worker")]
    return {"order": order, "iterations": iterations, "done": done,
            "hung": "Timeout (" in proc.stderr, "exit": proc.returncode,
            "seconds": round(seconds, 1), "stuck_at": stuck_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--stall", type=float, default=30.0,
                        help="seconds one iteration may take before its rank counts as stuck")
    parser.add_argument("--worker", choices=ORDERS, help=argparse.SUPPRESS)
    parser.add_argument("--progress", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.iterations, args.stall, args.progress)
        return
    for order in args.orders:
        print(json.dumps(launch(order, args.iterations, args.stall)), flush=True)


if __name__ == "__main__":
    main()
