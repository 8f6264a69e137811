"""Are bf16 samples as good as fp32 ones? One checkpoint sampled in fp32 and under bf16 autocast
(``sample.precision=bf16``) with the same seeds, each set's FID (and KID) against the checkpoint's
reference set, and the bf16 − fp32 difference per seed beside the seed-to-seed spread of the fp32
FIDs (the noise level of a FID of this many images). Also the time each set took to sample.

    python benchmarks/bf16_samples.py RUN [--num 1000] [--seeds 0 1 2] [--mode dynamic]
                                          [--features bf16] [--json]

The FID features of both sets and of the reference are computed the same way (``--features``,
default bf16 as in benchmarks/replicate.py: several times faster on a CPU with bf16 units, and on
MNIST within 0.1 of fp32 FIDs), so the only difference between the two sets is the sampling
precision.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import replace

from common import emit, machine, table

from diffmoe.evaluation.evaluate import EvalOptions, Evaluator
from diffmoe.evaluation.inception import FEATURE_PRECISIONS

PRECISIONS = ("fp32", "bf16")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory, checkpoint or saved folder")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mode", default=None, help="MoE inference mode (default: the run's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--features", default="bf16", choices=FEATURE_PRECISIONS,
                   help="the Inception's precision, for every set alike")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if len(args.seeds) < 2:
        p.error("--seeds needs at least two seeds to measure the seed-to-seed spread")
    logging.basicConfig(level=logging.WARNING)
    overrides = {"batch_size": args.batch_size}
    if args.mode:
        overrides["mode"] = args.mode
    evaluator = Evaluator.load(args.run, overrides, EvalOptions(
        num=args.num, device="cpu", progress=False, feature_precision=args.features))
    rows = []
    for seed in args.seeds:
        for precision in PRECISIONS:
            r = evaluator.run(replace(evaluator.sample, seed=seed, precision=precision))
            rows.append({"seed": seed, "precision": precision, "fid": r["fid"], "kid": r["kid"],
                         "c_avg_infer": r["c_avg_infer"],
                         "sampling_s": r["sampling_seconds"]})
    fid = {(r["seed"], r["precision"]): r["fid"] for r in rows}
    diffs = [fid[s, "bf16"] - fid[s, "fp32"] for s in args.seeds]
    fp32 = [fid[s, "fp32"] for s in args.seeds]
    summary = {
        "bf16_minus_fp32_fid": diffs,
        "mean_difference": statistics.mean(diffs),
        "fp32_fid_seed_sd": statistics.stdev(fp32),
        # The median over seeds: the first set drawn also pays the warm-up.
        "sampling_speedup": statistics.median(
            r32["sampling_s"] / r16["sampling_s"]
            for r32, r16 in zip(rows[0::2], rows[1::2])),
    }
    result = {"benchmark": "bf16_samples", "machine": machine(), "run": str(evaluator.checkpoint),
              "step": evaluator.step, "num": args.num, "mode": evaluator.sample.mode,
              "features": args.features,
              "rows": rows, "summary": summary}
    text = (table(rows, list(rows[0])) + "\n"
            + "\n".join(f"{k}: {v}" for k, v in summary.items()))
    emit(result, text, args.json)


if __name__ == "__main__":
    main()
