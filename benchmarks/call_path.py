"""Which files of the package one training step and one pipeline call run through: every
``diffmoe/*.py`` file a Python function of which is called during the second
``Trainer.train_step`` of a configs/digits_tiny.yaml run (4 steps), and during the second
``DiffMoEPipeline.__call__`` on that run (the first of each warms up lazy imports and caches).
The counts docs/architecture.md gives.

    python benchmarks/call_path.py [--json]
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import tempfile
from pathlib import Path
from typing import Callable

from common import emit

import diffmoe
from diffmoe import DiffMoEPipeline
from diffmoe.config import load_config
from diffmoe.train import Trainer

PACKAGE = Path(diffmoe.__file__).resolve().parent
CONFIG = PACKAGE.parent / "configs" / "digits_tiny.yaml"


def files_called(fn: Callable[[], object]) -> dict[str, list[str]]:
    """The package files whose functions ``fn`` calls, each with the names of those functions."""
    called: dict[str, set[str]] = collections.defaultdict(set)

    def profile(frame, event, arg) -> None:
        path = frame.f_code.co_filename
        if event == "call" and path.startswith(str(PACKAGE)):
            called[str(Path(path).relative_to(PACKAGE.parent))].add(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return {path: sorted(names) for path, names in sorted(called.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        settings = ["train.steps=4", "train.ckpt_every=4", "train.sample_every=4"]
        trainer = Trainer(load_config(CONFIG, [f"train.out_dir={tmp}/run"] + settings))
        try:
            trainer.train_step()
            step = files_called(trainer.train_step)
            trainer.train()
        finally:
            trainer.close()
        pipe = DiffMoEPipeline.from_pretrained(f"{tmp}/run", device="cpu")
        call = dict(class_labels=[1, 2], num_inference_steps=2, generator=0)
        pipe(**call)
        sample = files_called(lambda: pipe(**call))
    result = {"train_step": step, "pipeline_call": sample}
    text = "\n".join(f"{name}: {len(files)} files\n" + "\n".join(
        f"  {path}: {', '.join(names)}" for path, names in files.items())
        for name, files in result.items())
    emit(result, text, args.json)


if __name__ == "__main__":
    main()
