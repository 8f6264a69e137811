"""The ``diffmoe`` command.

    diffmoe train CONFIG [key=value ...] [--resume] [--dry-run]
    diffmoe sample CHECKPOINT [--num N --steps N --sampler euler|heun --cfg-scale S
                               --mode auto|dynamic|static|threshold --threshold G
                               --batch-size N --seed N --labels balanced|random|3,1,4
                               --weights ema|raw --out grid.png [--force]]

Problems with the input are reported as one ``error:`` line (exit status 2), not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from .config import SampleConfig, load_config
from .errors import DiffMoEError
from .paths import file_in_the_way

log = logging.getLogger("diffmoe")


def setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s" if "RANK" in os.environ \
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        sys.stdout.write(cfg.to_yaml())
        return 0
    from .train import train

    result = train(cfg, resume=args.resume)
    log.info("finished at step %d; checkpoint %s; samples %s", result.step,
             result.last_checkpoint, result.last_samples)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import sample_checkpoint

    fields = {f.name for f in dataclasses.fields(SampleConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    for name in ("steps", "num", "batch_size"):
        if name in overrides and overrides[name] <= 0:
            raise DiffMoEError(f"--{name.replace('_', '-')}={overrides[name]} must be a positive "
                               f"integer")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise DiffMoEError(f"--out '{out}' must end in .png (the grid is a PNG image; a JSON "
                           f"summary is written beside it)")
    if out.is_dir():
        raise DiffMoEError(f"--out '{out}' is a directory; pass a file such as "
                           f"{out / 'samples.png'}")
    if out.exists() and not args.force:
        raise DiffMoEError(f"output '{out}' already exists; pass --force to replace it or "
                           f"choose another --out")
    blocker = file_in_the_way(out.parent)
    if blocker is not None:
        raise DiffMoEError(f"--out '{out}' cannot be written: '{blocker}' is a file, not a "
                           f"directory; choose another --out")
    summary = sample_checkpoint(args.checkpoint, overrides, args.out, args.labels, args.device)
    log.info("wrote %s (C_avg_infer %.3f, mode %s)", summary["image"], summary["c_avg_infer"],
             summary["settings"]["mode"])
    sys.stdout.write(json.dumps({k: summary[k] for k in ("image", "c_avg_infer",
                                                         "activated_params")}) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffmoe", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", help="YAML config, e.g. configs/mnist_diffmoe.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.moe.num_experts=8")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in train.out_dir from its newest intact checkpoint")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate a PNG grid from a checkpoint or run directory",
                       description="Options left out take their values from the sample section "
                                   "of the checkpoint's config.")
    s.add_argument("checkpoint", help="a run directory or a checkpoints/step_XXXXXXXX directory")
    s.add_argument("--num", type=int, help="number of images")
    s.add_argument("--steps", type=int, help="sampling steps (paper: 250)")
    s.add_argument("--sampler", choices=["euler", "heun"])
    s.add_argument("--cfg-scale", dest="cfg_scale", type=float,
                   help="classifier-free guidance scale (1 = off)")
    s.add_argument("--mode", choices=["auto", "dynamic", "static", "threshold"],
                   help="MoE inference mode (auto: dynamic for DiffMoE)")
    s.add_argument("--threshold", type=float, help="constant threshold gamma for --mode threshold")
    s.add_argument("--batch-size", dest="batch_size", type=int,
                   help="sampling batch size (DiffMoE's token pool)")
    s.add_argument("--seed", type=int)
    s.add_argument("--labels", default=None, help="balanced (default), random, or e.g. 3,1,4")
    s.add_argument("--weights", choices=["ema", "raw"])
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", default="samples.png", help="output PNG (a JSON summary goes beside)")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.set_defaults(func=cmd_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after the train options, so collect leftovers here.
    args, extra = parser.parse_known_args(argv)
    if args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except DiffMoEError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:
        # The file system refused (permissions, a full disk, ...): one line naming the path.
        where = f": '{exc.filename}'" if exc.filename else ""
        sys.stderr.write(f"error: {exc.strerror or exc}{where}; check the path, its "
                         f"permissions and the free disk space\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
