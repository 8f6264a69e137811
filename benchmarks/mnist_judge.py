"""Make and check the MNIST judge (diffmoe/evaluation/mnist_judge.py).

    python benchmarks/mnist_judge.py --out diffmoe/evaluation/mnist_judge.safetensors  # remake
    python benchmarks/mnist_judge.py                       # check the committed weights

Remaking trains the judge with its recipe (deterministic, about a minute on 2 CPU cores), measures
its accuracy on the 10,000 held-out MNIST test images, writes the weights with the recipe, the
accuracy and the training time as metadata, and says whether the weights equal the committed
ones bit for bit (the metadata, holding times, differs). Checking loads the committed weights and
measures the same accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch
from common import machine
from safetensors.torch import load_file

from diffmoe.evaluation.mnist_judge import (
    WEIGHTS,
    JudgeRecipe,
    held_out_accuracy,
    judge_metadata,
    load_judge,
    save_judge,
    train_judge,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="train the judge and write its weights here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.out is None:
        judge = load_judge()
        result = {"weights": str(WEIGHTS), "test_accuracy": held_out_accuracy(judge),
                  "recorded": judge_metadata()}
    else:
        committed = load_file(str(WEIGHTS)) if WEIGHTS.is_file() else None
        start, cpu = time.perf_counter(), time.process_time()
        judge = train_judge()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        meta = {"recipe": dataclasses.asdict(JudgeRecipe()),
                "test_accuracy": held_out_accuracy(judge),
                "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1),
                "torch": torch.__version__}
        save_judge(judge, args.out, meta)
        made = judge.state_dict()
        same = committed is not None and committed.keys() == made.keys() and all(
            torch.equal(committed[k], made[k]) for k in made)
        result = dict(meta, weights=str(args.out), weights_equal_committed=same)
    result["machine"] = machine()
    sys.stdout.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
