"""Training step: DiffMoE-S-E16 vs Dense-DiT-S on 32x32x4 inputs (forward, backward, AdamW step),
timed interleaved in one process; peak memory of each measured in its own subprocess.

    python benchmarks/train_step.py [--batch 8] [--repeats 8] [--json]

With ``--against REV``: this checkout's trainer vs the one at git revision ``REV`` (default: the
commit before the redesign of issue 17), each a ``Trainer`` on ``--config`` in its own process
(``train_step_worker.py``), stepped in turn, ``--chunk`` steps at a time, so that both see the
same machine load. Reports the median step time, peak memory and whether the two end with the
same weights (same seeds and data, so a behaviour-preserving change ends bit for bit equal).

    python benchmarks/train_step.py --against ec998bd [--config configs/mnist_diffmoe.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from common import emit, interleaved_medians, machine, table

from diffmoe.config import load_config
from diffmoe.diffusion import FlowMatching
from diffmoe.loss import training_loss
from diffmoe.models import build_model
from diffmoe.train import build_optimizer

MODELS = {"dense": "Dense-DiT-S", "diffmoe": "DiffMoE-S-E16"}
REPO = Path(__file__).resolve().parents[1]
BEFORE_REDESIGN = "ec998bd"  # the last commit before issue 17's redesign
ADAM_STATES = 2  # exp_avg and exp_avg_sq
MANY_STEPS = 10**8 - 1  # more than any comparison runs; the most a checkpoint name's 8 digits hold


def make_step(preset: str, batch: int, device: torch.device, dtype: torch.dtype):
    cfg = load_config(None, [f"model.preset={preset}"])
    model = build_model(cfg.model).to(device).train()
    opt = build_optimizer(model, cfg.train)
    flow = FlowMatching(cfg.model.in_channels)
    x = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = training_loss(flow.loss(model, x, y), cfg.model.moe).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmHWM: peak resident set, VmRSS: current), in bytes.
    Unlike getrusage's maxrss it starts afresh at exec, so the parent's size does not leak in."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(preset: str, batch: int, steps: int, device: torch.device,
                      dtype: torch.dtype) -> dict:
    """Run in a fresh process: bytes of peak memory while training ``steps`` steps."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _status_bytes("VmRSS")
    model, step = make_step(preset, batch, device, dtype)
    for _ in range(steps):
        step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status_bytes("VmHWM") - before
    return {"peak_bytes": peak, "params": sum(p.numel() for p in model.parameters())}


def export_revision(rev: str, into: Path) -> Path:
    """The package tree of git revision ``rev`` under ``into`` (``git archive``; no checkout)."""
    archive = into / "tree.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), rev],
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


class Worker:
    """A ``train_step_worker.py`` process importing the ``diffmoe`` found in ``source``."""

    def __init__(self, source: Path, config: str, overrides: list[str]):
        env = dict(os.environ, PYTHONPATH=str(source))
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("train_step_worker.py")), config,
             *overrides], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            cwd=str(source))
        self.package = self._reply()["ready"]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker exited with status {self.proc.wait()}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def compare_revisions(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        tmp = Path(tmp)
        before_tree = export_revision(args.against, tmp)
        workers = {}
        for name, source in (("before", before_tree), ("after", REPO)):
            overrides = [f"train.out_dir={tmp / name}", f"train.device={args.device}",
                         f"train.steps={MANY_STEPS}"]
            if args.batch:
                overrides.append(f"train.batch_size={args.batch}")
            workers[name] = Worker(source, args.config, overrides)
        times: dict[str, list[float]] = {name: [] for name in workers}
        for round_ in range(args.warmup + args.repeats):
            for name, worker in workers.items():
                seconds = worker.ask(f"steps {args.chunk}")["seconds"] / args.chunk
                if round_ >= args.warmup:
                    times[name].append(seconds)
        reports = {name: w.ask("report") for name, w in workers.items()}
        for w in workers.values():
            w.close()
    median = {name: statistics.median(ts) for name, ts in times.items()}
    rows = [{"code": f"{name} ({args.against if name == 'before' else 'this checkout'})",
             "step_ms": 1e3 * median[name], "peak_MiB": reports[name]["peak_bytes"] / 2**20}
            for name in workers]
    result = {"benchmark": "train_step_against", "machine": machine(), "against": args.against,
              "config": args.config, "batch": args.batch, "steps": reports["after"]["steps"],
              "rows": rows, "time_ratio": median["after"] / median["before"],
              "memory_ratio": reports["after"]["peak_bytes"] / reports["before"]["peak_bytes"],
              "same_weights": reports["after"]["digest"] == reports["before"]["digest"]}
    text = table(rows, ["code", "step_ms", "peak_MiB"]) + (
        f"\nafter / before: step time {result['time_ratio']:.3f}, peak memory "
        f"{result['memory_ratio']:.3f}; same weights after {result['steps']} steps: "
        f"{'yes' if result['same_weights'] else 'no'}")
    emit(result, text, args.json)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=None,
                   help="images per step (default 8; with --against: the config's)")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--against", nargs="?", const=BEFORE_REDESIGN, default=None, metavar="REV",
                   help="compare this checkout's trainer with the one at git revision REV")
    p.add_argument("--config", default=str(REPO / "configs" / "mnist_diffmoe.yaml"),
                   help="with --against: the training config")
    p.add_argument("--chunk", type=int, default=5, help="with --against: steps per turn")
    args = p.parse_args()
    if args.against:
        compare_revisions(args)
        return
    args.batch = args.batch or 8
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    if args.memory_child:
        sys.stdout.write(json.dumps(peak_memory_child(args.memory_child, args.batch, 3, device,
                                                      dtype)) + "\n")
        return
    steps = {name: make_step(preset, args.batch, device, dtype)[1]
             for name, preset in MODELS.items()}
    times = interleaved_medians(steps, args.repeats, args.warmup, device)
    mem = {}
    for name, preset in MODELS.items():
        out = subprocess.run([sys.executable, __file__, "--memory-child", preset, "--batch",
                              str(args.batch), "--device", args.device, "--dtype", args.dtype],
                             check=True, capture_output=True, text=True).stdout
        mem[name] = json.loads(out.strip().splitlines()[-1])
    extra_params = mem["diffmoe"]["params"] - mem["dense"]["params"]
    # weights + gradients + AdamW moments of the extra parameters, in float32
    extra_state = extra_params * 4 * (2 + ADAM_STATES)
    budget = 1.3 * mem["dense"]["peak_bytes"] + extra_state
    rows = [{"model": MODELS[n], "step_ms": 1e3 * times[n], "time_ratio": times[n] / times["dense"],
             "peak_MiB": mem[n]["peak_bytes"] / 2**20, "params_M": mem[n]["params"] / 1e6}
            for n in MODELS]
    result = {"benchmark": "train_step", "machine": machine(), "dtype": args.dtype,
              "batch": args.batch, "rows": rows,
              "time_ratio": times["diffmoe"] / times["dense"],
              "memory_ratio": mem["diffmoe"]["peak_bytes"] / mem["dense"]["peak_bytes"],
              "memory_budget_MiB": budget / 2**20,
              "memory_within_budget": mem["diffmoe"]["peak_bytes"] <= budget}
    text = table(rows, ["model", "step_ms", "time_ratio", "peak_MiB", "params_M"]) + (
        f"\nmemory: DiffMoE peak {rows[1]['peak_MiB']:.0f} MiB vs budget 1.3 x dense + extra "
        f"parameter state = {budget / 2**20:.0f} MiB")
    emit(result, text, args.json)


if __name__ == "__main__":
    main()
