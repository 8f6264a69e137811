"""Text-to-image checkpoints judged side by side: the shapes judge's GenEval-style table (and the
strict one) for several checkpoints and guidance scales, all on the same prompts and seeds.

    python benchmarks/t2i_judge.py --ckpt dense=runs/t2i_shapes_dense \\
        --ckpt diffmoe=runs/t2i_shapes_diffmoe --cfg-scale 1.5 4 [--steps 25] [--no-fid] \\
        [--categories single_object colors] [--out t2i.json] [--grids DIR]

Every (checkpoint, guidance scale) pair is one row; the last row is the judge's chance level
(ground-truth renders of other prompts of the same category); a third table says what the
one-object prompts drew (asked shape against the largest object's shape). ``--grids`` also
writes each row's judged images as a PNG (two prompts per row of the grid, in the JSON's order).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from common import machine

from diffmoe.data.shapes import CATEGORY_NAMES
from diffmoe.t2i.sample import (
    JudgeOptions,
    evaluate_text_checkpoint,
    judge_table,
    public,
    save_judged_grid,
    shape_confusion_table,
)


def parse_ckpt(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--ckpt {text!r}: write NAME=RUN_OR_CHECKPOINT")
    return name, path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=parse_ckpt, action="append", required=True,
                   help="NAME=RUN_OR_CHECKPOINT (repeat)")
    p.add_argument("--cfg-scale", type=float, nargs="+", default=[None],
                   help="guidance scales (default: each checkpoint's own)")
    p.add_argument("--steps", type=int, default=25, help="Euler sampling steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--per-category", type=int, default=8)
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--categories", nargs="+", default=list(CATEGORY_NAMES),
                   help="the GenEval categories to judge (default all six)")
    p.add_argument("--no-fid", action="store_true")
    p.add_argument("--out", help="write every row's scores as JSON here")
    p.add_argument("--grids", help="write every row's judged images as PNGs into this folder")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    options = JudgeOptions(per_category=args.per_category,
                           samples_per_prompt=args.samples_per_prompt,
                           categories=tuple(args.categories), fid=not args.no_fid,
                           progress=False)
    results: dict[str, dict] = {}
    for name, path in args.ckpt:
        for cfg_scale in args.cfg_scale:
            overrides = {"steps": args.steps, "batch_size": args.batch_size}
            if cfg_scale is not None:
                overrides["cfg_scale"] = cfg_scale
            result = evaluate_text_checkpoint(path, overrides, options)
            row = f"{name}, step {result['step']}, cfg {result['settings']['cfg_scale']:g}"
            logging.warning("%s: overall %.3f (strict %.3f)", row, result["overall"],
                            result["strict_overall"])
            if args.grids:
                Path(args.grids).mkdir(parents=True, exist_ok=True)
                slug = f"{name}_cfg{result['settings']['cfg_scale']:g}".replace(".", "p")
                save_judged_grid(result, Path(args.grids) / f"{slug}.png")
            results[row] = public(result)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "rows": results}, indent=1))
    print("GenEval's rules:\n" + judge_table(results)
          + "\n\nstrict rule (exactly the objects named):\n" + judge_table(results, strict=True)
          + "\n\nwhat one-object prompts drew (shape of the largest object):\n"
          + shape_confusion_table(results))


if __name__ == "__main__":
    main()
