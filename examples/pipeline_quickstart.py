"""Sample a trained class-conditional model with the pipeline, save it as a Hub-style folder
(config.json, model.safetensors, README.md) and load that folder back.

    python examples/pipeline_quickstart.py RUN_OR_FOLDER OUT_DIR [--steps 50]

RUN_OR_FOLDER: a run directory (e.g. what ``make demo`` trains), one of its checkpoints, or a
folder written by save_pretrained.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffmoe import DiffMoEPipeline

NUM_IMAGES = 4  # one per class 0, 1, 2, ...


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's own")
    args = parser.parse_args(argv)

    pipe = DiffMoEPipeline.from_pretrained(args.model, device="cpu")
    labels = [i % pipe.config.model.num_classes for i in range(NUM_IMAGES)]
    out = pipe(class_labels=labels, num_inference_steps=args.steps, generator=0)
    args.out.mkdir(parents=True, exist_ok=True)
    for label, image in zip(labels, out.images):
        image.save(args.out / f"class_{label}.png")

    folder = pipe.save_pretrained(args.out / "pretrained")
    again = DiffMoEPipeline.from_pretrained(folder, device="cpu")
    first = pipe(class_labels=labels, num_inference_steps=args.steps, generator=0,
                 output_type="pt").images
    second = again(class_labels=labels, num_inference_steps=args.steps, generator=0,
                   output_type="pt").images
    result = {"folder": str(folder), "mode": out.capacity.mode,
              "c_avg_infer": out.capacity.c_avg_infer,
              "activated_params": out.capacity.activated_params,
              "same_images_after_reload": bool(torch.equal(first, second))}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
