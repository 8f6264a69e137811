"""Every sampler on a flow-matching and a DDPM checkpoint: FID and sampling speed per row.

Two passes over the same rows:

1. quality: ``diffmoe eval`` for each row (``--num`` samples against the checkpoints' training
   data), recording FID, KID, model calls per batch and C_avg_infer;
2. speed: every row generates one batch of ``--speed-num`` images, interleaved and repeated
   (``--repeats`` rounds), so images/s of all rows are measured side by side in one process,
   apart from the quality pass (which may run with other work on the machine).

    python benchmarks/samplers.py --flow RUN_OR_CKPT --ddpm RUN_OR_CKPT [--num 500] [--json]
        [--skip-quality | --skip-speed] [--rows flow:euler:50 ...]

A row is OBJECTIVE:SAMPLER:STEPS (``--rows`` to change them; the defaults are below).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from common import emit, interleaved_medians, machine, table

from diffmoe.evaluation.evaluate import EvalOptions, Evaluator
from diffmoe.sample import generate, parse_labels

DEFAULT_ROWS = ["flow:euler:50", "flow:heun:25", "flow:dopri5:10", "flow:sde:50",
                "ddpm:ddpm:250", "ddpm:ddpm:50", "ddpm:ddim:50", "ddpm:ddim:25"]


def parse_row(text: str) -> tuple[str, str, int]:
    objective, sampler, steps = text.split(":")
    return objective, sampler, int(steps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flow", help="flow-matching run or checkpoint (for flow:* rows)")
    p.add_argument("--ddpm", help="DDPM run or checkpoint (for ddpm:* rows)")
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    p.add_argument("--num", type=int, default=500, help="samples per FID")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="guidance scale (default: each checkpoint's own)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--speed-num", type=int, default=20, help="images per timed batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    p.add_argument("--json", action="store_true")
    return p


def timed_generation(ev: Evaluator, num: int) -> Callable[[], None]:
    """One batch of ``num`` images with the evaluator's settings, for the speed pass."""
    s = replace(ev.sample, batch_size=num)
    labels = parse_labels(None, num, ev.model.cfg.num_classes, s.seed)

    def fn() -> None:
        generate(ev.model, ev.objective, labels, s, progress=False)
    return fn


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ckpts = {"flow": args.flow, "ddpm": args.ddpm}
    rows = [parse_row(r) for r in args.rows]
    for objective, _, _ in rows:
        if not ckpts.get(objective):
            p.error(f"rows of the {objective} objective need --{objective}")

    results: dict[str, dict] = {}
    evaluators: dict[str, Evaluator] = {}
    for objective, sampler, steps in rows:
        name = f"{objective}:{sampler}:{steps}"
        overrides = {"sampler": sampler, "steps": steps, "batch_size": args.batch_size}
        if args.cfg_scale is not None:
            overrides["cfg_scale"] = args.cfg_scale
        ev = Evaluator.load(ckpts[objective], overrides,
                            EvalOptions(num=args.num, progress=False))
        evaluators[name] = ev
        row = {"row": name, "objective": objective, "sampler": sampler, "steps": steps,
               "cfg_scale": ev.sample.cfg_scale}
        if not args.skip_quality:
            r = ev.run()
            row.update(fid=r["fid"], kid=r["kid"], calls=r["model_calls_per_batch"],
                       c_avg=r["c_avg_infer"], eval_images_per_s=r["images_per_second"])
            logging.warning("%s: FID %.2f, %g calls per batch", name, r["fid"], row["calls"])
        results[name] = row

    if not args.skip_speed:
        tasks = {n: timed_generation(ev, args.speed_num) for n, ev in evaluators.items()}
        medians = interleaved_medians(tasks, args.repeats, warmup=1, device=torch.device("cpu"))
        for name, seconds in medians.items():
            results[name]["images_per_s"] = args.speed_num / seconds
    out_rows = list(results.values())
    result = {"machine": machine(), "num": args.num, "speed_num": args.speed_num,
              "checkpoints": ckpts, "rows": out_rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    columns = ["row", "cfg_scale", "calls", "fid", "kid", "c_avg", "images_per_s"]
    emit(result, table(out_rows, columns), args.json)


if __name__ == "__main__":
    main()
