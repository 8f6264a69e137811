"""The ``diffmoe`` command.

    diffmoe train CONFIG [key=value ...] [--resume [--accept-changes]] [--dry-run]
    diffmoe config --list [SECTION_OR_KEY] [--format text|markdown]
    diffmoe sample CHECKPOINT|FOLDER [--num N --steps N --sampler NAME --cfg-scale S
                               --mode auto|dynamic|static|threshold|predictor --threshold G
                               --batch-size N --seed N --labels balanced|random|3,1,4
                               --weights ema|raw --vae DIR --out grid.png [--force] [--judge]]
    diffmoe sample T2I_CHECKPOINT --prompt "a red circle" [--prompt ...] [sampling options]
    diffmoe eval CHECKPOINT [sampling options] [--num N --ref SPEC --save-npz F --out F]
    diffmoe eval T2I_CHECKPOINT [--per-category N --samples-per-prompt N --no-fid]
    diffmoe sweep-thresholds CHECKPOINT [--thresholds G ...] [--budget C] [--num N]
    diffmoe analyze CHECKPOINT [--batch-sizes B ...] [--out DIR]
    diffmoe fid SET SET [--image-size 256]  (SET: DATASET[:SPLIT][:N], folder:DIR[:N], .npz)
    diffmoe cache-latents IMAGE_FOLDER OUT --vae VAE_DIR [--image-size 256 --shard-size N
                          --batch-size N --workers N --device auto|cpu|cuda]
                          (also under torchrun)
    diffmoe import-official CHECKPOINT [--config THEIR_YAML] OUT [key=value ...] [--vae DIR]
                            [--trust-pickle]
    diffmoe export-official RUN OUT
    diffmoe plan CONFIG [key=value ...] [--gpus N] [--gpu-memory GIB --headroom 0.1]
                 [--gpu H100 --mfu 0.4]
                 [--capacity C] [--json]

Problems with the input are reported as one ``error:`` line (exit status 2), not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .config import (
    DEVICES,
    INFERENCE_MODES,
    PRECISIONS,
    SAMPLERS,
    WEIGHTS,
    SampleConfig,
    load_config,
)
from .config.docs import FORMATS
from .config.ranges import COMMAND_OPTION_RANGES, OPTION_RANGES, check_int
from .data.shapes import CATEGORY_NAMES
from .errors import DiffMoEError
from .fileio import to_json
from .paths import check_outputs, user_path

log = logging.getLogger("diffmoe")


def setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s" if "RANK" in os.environ \
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S")


def emit(value: dict) -> None:
    """Print a command's result as one line of strict JSON on stdout."""
    sys.stdout.write(to_json(value) + "\n")


def cmd_train(args: argparse.Namespace) -> int:
    if args.accept_changes and not args.resume:
        raise DiffMoEError("--accept-changes accepts new optimisation settings for a run that "
                           "continues; add --resume, or drop it")
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        sys.stdout.write(cfg.to_yaml())
        return 0
    from .train import train

    result = train(cfg, resume=args.resume, accept_changes=args.accept_changes)
    log.info("finished at step %d; checkpoint %s; samples %s", result.step,
             result.last_checkpoint, result.last_samples)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config.docs import render

    sys.stdout.write(render(args.format, args.under))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import summary_path

    overrides = sample_overrides(args, with_num=True)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise DiffMoEError(f"--out '{out}' must end in .png (the grid is a PNG image; a JSON "
                           f"summary is written beside it)")
    if out.is_dir():
        raise DiffMoEError(f"--out '{out}' is a directory; pass a file such as "
                           f"{out / 'samples.png'}")
    check_outputs([out, summary_path(out)], args.force)
    from .hub import is_folder, read_config

    if args.judge:
        from .evaluation.mnist_judge import check_judgeable, judge_samples

        check_judgeable(read_config(args.checkpoint))
    if args.prompt is not None or checkpoint_condition(args.checkpoint) == "text":
        if is_folder(args.checkpoint):
            raise DiffMoEError(f"'{args.checkpoint}' is a text-to-image folder, which diffmoe "
                               f"sample does not read yet; sample it in Python: "
                               f"DiffMoEPipeline.from_pretrained(folder)(prompt=[...])")
        return cmd_sample_text(args, overrides)
    from .pipeline import sample_grid

    summary = sample_grid(args.checkpoint, overrides, args.out, args.labels, args.device,
                          measure=judge_samples if args.judge else None, vae=args.vae)
    log.info("wrote %s (C_avg_infer %.3f, mode %s)", summary["image"], summary["c_avg_infer"],
             summary["settings"]["mode"])
    shown = {k: summary[k] for k in ("image", "c_avg_infer", "activated_params")}
    if args.judge:
        judged = summary["judge"]
        log.info("the MNIST judge reads %.1f%% of the %d samples as their label (the judge "
                 "itself reads %.2f%% of the MNIST test digits right)",
                 100 * judged["class_consistency"], judged["num"],
                 100 * judged["judge_test_accuracy"])
        shown["class_consistency"] = judged["class_consistency"]
    emit(shown)
    return 0


def require_class_conditional(path: str, command: str, instead: str) -> None:
    """``command`` measures over class labels: refuse a text-to-image checkpoint in one line."""
    if checkpoint_condition(path) == "text":
        raise DiffMoEError(f"{command} works on class-conditional checkpoints and '{path}' is "
                           f"text-to-image; {instead}")


def checkpoint_condition(path: str) -> str:
    from .t2i.sample import checkpoint_condition as condition

    return condition(path)


def cmd_sample_text(args: argparse.Namespace, overrides: dict) -> int:
    """``diffmoe sample RUN --prompt P [--prompt P ...]`` for a text-to-image checkpoint."""
    from .t2i.sample import check_condition_args, sample_prompts

    check_condition_args(checkpoint_condition(args.checkpoint), args.prompt, args.labels,
                         "sample")
    summary = sample_prompts(args.checkpoint, overrides, args.out, args.prompt, args.device,
                             args.vae)
    log.info("wrote %s (%d prompts, C_avg_infer %.3f, mode %s)", summary["image"],
             len(args.prompt), summary["c_avg_infer"], summary["settings"]["mode"])
    emit({k: summary[k] for k in ("image", "c_avg_infer", "activated_params")})
    return 0


def cmd_eval_text(args: argparse.Namespace) -> int:
    """``diffmoe eval`` for a text-to-image checkpoint: the shapes judge's scores and FID."""
    from .fileio import write_json
    from .t2i.sample import (
        JudgeOptions,
        check_condition_args,
        evaluate_text_checkpoint,
        judge_outputs,
        judge_table,
        public,
        save_judged_grid,
        shape_confusion_table,
    )

    check_condition_args("text", None, args.labels, "eval")
    if args.ref is not None:
        raise DiffMoEError("--ref does not apply to a text-to-image checkpoint; its FID is "
                           "against the shapes test split (or pass --no-fid)")
    if args.num is not None:
        raise DiffMoEError("--num does not apply to a text-to-image checkpoint; set the sample "
                           "count with --per-category and --samples-per-prompt")
    options = JudgeOptions(per_category=args.per_category,
                           samples_per_prompt=args.samples_per_prompt,
                           categories=tuple(args.categories), fid=not args.no_fid,
                           feature_batch=args.feature_batch, cache_dir=args.cache_dir,
                           device=args.device, progress=not args.no_progress)
    from .checkpoint import open_checkpoint

    ckpt_path = open_checkpoint(args.checkpoint).path
    out = Path(args.out) if args.out else default_output(ckpt_path, "eval", "judge.json")
    if out.suffix.lower() != ".json":
        raise DiffMoEError(f"--out '{out}' must end in .json (the results are JSON; the judged "
                           f"grid is written beside it as a PNG)")
    out, grid = check_outputs(judge_outputs(out), args.force)
    result = evaluate_text_checkpoint(args.checkpoint, sample_overrides(args), options)
    write_json(out, public(result))
    save_judged_grid(result, grid)
    name = {f"step {result['step']}": result}
    log.info("judge, GenEval's rules (%s, samples %s):\n%s\nthe strict rule (exactly the "
             "objects named, nothing else):\n%s\nwhat one-object prompts drew (shape of the "
             "largest object):\n%s", out, grid, judge_table(name),
             judge_table(name, strict=True), shape_confusion_table(name))
    emit({"scores": result["scores"], "overall": result["overall"],
          "strict_overall": result["strict_overall"], "fid": result["fid"], "out": str(out)})
    return 0


def add_sampling_args(s: argparse.ArgumentParser, with_num: bool) -> None:
    s.add_argument("checkpoint", type=user_path,
                   help="a run directory or a checkpoints/step_XXXXXXXX directory")
    if with_num:
        s.add_argument("--num", type=int, help="number of images")
    s.add_argument("--steps", type=int,
                   help="sampling steps, or DDPM respaced timesteps (paper: 250)")
    s.add_argument("--sampler", choices=list(SAMPLERS),
                   help="flow: euler, heun, dopri5, sde; ddpm: ddpm, ddim (auto: euler or ddpm)")
    s.add_argument("--ddim-eta", dest="ddim_eta", type=float, help="DDIM eta (0 = deterministic)")
    s.add_argument("--ode-rtol", dest="ode_rtol", type=float, help="dopri5 relative tolerance")
    s.add_argument("--ode-atol", dest="ode_atol", type=float, help="dopri5 absolute tolerance")
    s.add_argument("--sde-noise", dest="sde_noise", type=float,
                   help="flow SDE diffusion scale w (0 = Euler)")
    s.add_argument("--guidance-channels", dest="guidance_channels", type=int,
                   help="guide only the first N channels (0 = all; DiT's legacy: 3)")
    s.add_argument("--cfg-scale", dest="cfg_scale", type=float,
                   help="classifier-free guidance scale (1 = off)")
    s.add_argument("--mode", choices=list(INFERENCE_MODES),
                   help="MoE inference mode (auto: dynamic for DiffMoE)")
    s.add_argument("--threshold", type=float, help="constant threshold gamma for --mode threshold")
    s.add_argument("--batch-size", dest="batch_size", type=int,
                   help="sampling batch size (DiffMoE's token pool)")
    s.add_argument("--seed", type=int)
    s.add_argument("--labels", default=None, help="balanced (default), random, or e.g. 3,1,4")
    s.add_argument("--weights", choices=list(WEIGHTS))
    s.add_argument("--device", default="auto",
                   help=f"one of {', '.join(DEVICES)} (default auto: CUDA when there is one)")
    s.add_argument("--precision", choices=list(PRECISIONS),
                   help="fp32 (on CUDA with TF32 matmuls, see --no-tf32) or bf16 autocast")
    s.add_argument("--no-tf32", dest="tf32", action="store_const", const=False, default=None,
                   help="keep fp32 matmuls in full fp32 on CUDA")
    s.add_argument("--compile", action="store_const", const=True, default=None,
                   help="torch.compile the model for sampling")


def sample_overrides(args: argparse.Namespace, with_num: bool = False) -> dict:
    """The sampling options given on the command line (the rest come from the checkpoint; both
    are validated together when it is loaded). ``num`` is a sampling setting only for
    ``diffmoe sample``; the evaluation commands own it."""
    fields = {f.name for f in dataclasses.fields(SampleConfig)} - (set() if with_num else {"num"})
    return {k: v for k, v in vars(args).items() if k in fields and v is not None}


def default_output(checkpoint_path: Path, kind: str, name: str) -> Path:
    """``<run>/<kind>/<step>/<name>`` next to the checkpoint's run."""
    return checkpoint_path.parent.parent / kind / checkpoint_path.name / name


def eval_options(args: argparse.Namespace):
    from .evaluation.evaluate import EvalOptions

    if args.num is not None and args.num < 2:
        raise DiffMoEError(f"--num {args.num}: FID needs at least 2 samples")
    return EvalOptions(num=args.num or EvalOptions.num, reference=args.ref,
                       labels=args.labels or "balanced", feature_batch=args.feature_batch,
                       cache_dir=args.cache_dir, device=args.device,
                       progress=not args.no_progress)


def cmd_eval(args: argparse.Namespace) -> int:
    """``diffmoe eval``, also under torchrun: every process samples its share of the batches and
    rank 0 writes the result."""
    from . import distributed
    from .device import resolve_device

    if checkpoint_condition(args.checkpoint) == "text":
        return cmd_eval_text(args)
    info = distributed.setup(resolve_device(args.device, "--device").type)
    finished = False
    try:
        code = _evaluate(args, info.is_main)
        finished = True
        return code
    finally:
        distributed.teardown(wait_for_others=finished)


def _evaluate(args: argparse.Namespace, is_main: bool) -> int:
    from .evaluation.evaluate import Evaluator
    from .fileio import write_json

    evaluator = Evaluator.load(args.checkpoint, sample_overrides(args), eval_options(args))
    out = Path(args.out) if args.out else default_output(evaluator.checkpoint, "eval",
                                                          "eval.json")
    check_outputs([out], args.force)  # on every rank, so that all stop alike
    if args.save_npz:
        check_outputs([args.save_npz], args.force, "--save-npz")
    result = evaluator.run(save_npz=args.save_npz)
    if not is_main:
        return 0
    write_json(out, result)
    log.info("FID %.3f  KID %s  precision %s  recall %s  C_avg_infer %.3f  (%s)", result["fid"],
             _fmt(result["kid"]), _fmt(result["precision"]), _fmt(result["recall"]),
             result["c_avg_infer"], out)
    emit({k: result[k] for k in ("fid", "kid", "precision", "recall", "c_avg_infer",
                                 "activated_params", "images_per_second")} | {"out": str(out)})
    return 0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def cmd_sweep(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import Evaluator, sweep, sweep_outputs, sweep_table
    from .evaluation.plots import plot_sweep
    from .fileio import write_json

    require_class_conditional(
        args.checkpoint, "sweep-thresholds",
        "judge one threshold at a time with diffmoe eval CHECKPOINT --mode threshold --threshold G")
    options = eval_options(args)
    evaluator = Evaluator.load(args.checkpoint, sample_overrides(args), options)
    out_dir = Path(args.out) if args.out else default_output(evaluator.checkpoint, "eval",
                                                              "sweep")
    json_path, png_path = check_outputs(sweep_outputs(out_dir), args.force)
    result = sweep(evaluator, args.thresholds, args.budget)
    plot = plot_sweep(result["rows"], png_path, args.budget)
    result["figure"] = str(plot)
    write_json(json_path, result)
    sys.stdout.write(sweep_table(result) + "\n")
    log.info("wrote %s and %s", json_path, plot)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .evaluation.analysis import AnalyzeOptions, analysis_outputs, analyze
    from .evaluation.evaluate import EvalOptions, Evaluator

    require_class_conditional(
        args.checkpoint, "analyze",
        "diffmoe eval CHECKPOINT reports its capacity (C_avg_infer) on the judge's prompts")
    options = EvalOptions(num=args.num, labels=args.labels or "balanced",
                          device=args.device, progress=not args.no_progress)
    evaluator = Evaluator.load(args.checkpoint, sample_overrides(args), options, metrics=False)
    out_dir = Path(args.out) if args.out else default_output(evaluator.checkpoint, "analysis",
                                                              "")
    check_outputs(analysis_outputs(out_dir), args.force)
    result = analyze(evaluator, out_dir, AnalyzeOptions(
        num=args.num, batch_sizes=tuple(args.batch_sizes),
        num_per_batch_size=args.num_per_batch_size, progress=not args.no_progress))
    for name, path in result["figures"].items():
        log.info("%s: %s", name, path)
    emit({"c_avg_infer": result["c_avg_infer"], "capacity_by_class": result["capacity_by_class"],
          "out": str(out_dir)})
    return 0


def cmd_fid(args: argparse.Namespace) -> int:
    from .evaluation.metrics import compare
    from .evaluation.reference import load_reference

    if args.num < 2:
        raise DiffMoEError(f"--num {args.num}: FID needs at least 2 images per set")
    refs = [load_reference(spec, args.num, args.cache_dir, args.feature_batch,
                           not args.no_progress, args.image_size)
            for spec in (args.first, args.second)]
    result = compare(refs[0].stats, refs[1].stats,
                     names=(f"'{refs[0].source}'", f"'{refs[1].source}'"))
    result.update(first=refs[0].source, second=refs[1].source)
    for warning in result["warnings"]:
        log.warning("%s", warning)
    emit(result)
    return 0


def add_metric_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", default=None,
                   help="reference set: DATASET[:SPLIT][:N] or folder:DIR[:N] (default: the "
                        "checkpoint's training data, --num images) or an ADM .npz (mu/sigma or "
                        "arr_0 images)")
    p.add_argument("--feature-batch", dest="feature_batch", type=int, default=50,
                   help="images per Inception forward")
    p.add_argument("--cache-dir", dest="cache_dir", type=user_path, default=None,
                   help="where reference statistics are cached (default $DIFFMOE_CACHE_DIR, else "
                        "for eval the run's cache/, else ~/.cache/diffmoe)")
    p.add_argument("--no-progress", dest="no_progress", action="store_true",
                   help="no progress bars")


# Defaults sized so that each command takes minutes on 2 CPU cores with the MNIST demo model.
DEFAULT_THRESHOLDS = (0.9, 0.7, 0.5, 0.3, 0.1)
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def cmd_cache_latents(args: argparse.Namespace) -> int:
    from .data.latents import cache_latents

    index = cache_latents(args.image_folder, args.out, args.vae, image_size=args.image_size,
                          shard_size=args.shard_size, batch_size=args.batch_size,
                          device=args.device, progress=not args.no_progress,
                          workers=args.workers)
    if index is not None:
        emit({k: index[k] for k in ("num_latents", "num_skipped")})
    return 0


def cmd_import_official(args: argparse.Namespace) -> int:
    from .official import import_official

    path = import_official(args.checkpoint, args.config, args.out, args.overrides,
                           trust_pickle=args.trust_pickle, vae=args.vae)
    emit({"checkpoint": str(path)})
    return 0


def cmd_export_official(args: argparse.Namespace) -> int:
    from .official import export_official

    path = export_official(args.run, args.out)
    emit({"checkpoint": str(path)})
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import plan, report

    cfg = load_config(args.config, args.overrides)
    result = plan(cfg, args.config, args.gpus, gpu_memory_gib=args.gpu_memory,
                  headroom=args.headroom, gpu=args.gpu, mfu=args.mfu, capacity=args.capacity)
    if args.json:
        emit(result.to_dict())
    else:
        sys.stdout.write(report(result) + "\n")
    return 0


def add_plan_command(sub) -> None:
    from .plan import DEFAULT_GPU, DEFAULT_HEADROOM, DEFAULT_MFU, GPU_PEAK_FLOPS

    p = sub.add_parser(
        "plan", help="simulate one training step of a config at its real size on the CPU: "
                     "peak memory per GPU, FLOPs, step time, and what fits",
        description="Builds the config's model on fake tensors (no memory), runs one training "
                    "step and one dynamic sampling step of it as diffmoe train / sample would, "
                    "under the config's engine on --gpus ranks, and reports per GPU: peak memory "
                    "by category, FLOPs, and the step time at a given MFU. With --gpu-memory, "
                    "says whether it fits, and if not the smallest change that does "
                    "(docs/performance.md, 'Planning a launch').")
    p.add_argument("config", help="YAML config, e.g. configs/imagenet/diffmoe-xl-e16-flow.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.precision=bf16")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs (ranks) the global train.batch_size is split over (default 1)")
    p.add_argument("--gpu-memory", dest="gpu_memory", type=float, default=None, metavar="GIB",
                   help="memory per GPU in GiB, e.g. 80: say whether the step fits, and what "
                        "would")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help=f"share of --gpu-memory kept free of tensors for what the CPU "
                        f"simulation does not see: CUDA context, cuBLAS workspaces, NCCL, "
                        f"allocator fragmentation (default {DEFAULT_HEADROOM})")
    p.add_argument("--gpu", default=DEFAULT_GPU, choices=list(GPU_PEAK_FLOPS),
                   help=f"the chip whose peak FLOP/s the step time uses (default {DEFAULT_GPU})")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help=f"model-FLOPs utilisation assumed for the step time (an input, not a "
                        f"claim; default {DEFAULT_MFU})")
    p.add_argument("--capacity", type=float, default=1.0,
                   help="C_avg of the simulated dynamic sampling step (default 1)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    p.set_defaults(func=cmd_plan)


def add_cache_latents_command(sub) -> None:
    c = sub.add_parser("cache-latents", help="encode an image folder to a sharded VAE latent "
                                             "cache (resumable; torchrun-parallel)")
    c.add_argument("image_folder", type=user_path,
                   help="IMAGE_FOLDER/<class>/<image> (the ImageNet layout), or "
                        "IMAGE_FOLDER/metadata.jsonl of captions")
    c.add_argument("out", type=user_path, help="cache directory (data.path of a latents config)")
    c.add_argument("--vae", required=True, type=user_path,
                   help="local diffusers AutoencoderKL directory")
    c.add_argument("--image-size", dest="image_size", type=int, default=256)
    c.add_argument("--shard-size", dest="shard_size", type=int, default=1000,
                   help="images per shard (the unit of resumption)")
    c.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    c.add_argument("--workers", type=int, default=0,
                   help="processes decoding images (default 0: the main process)")
    c.add_argument("--device", default="auto", choices=list(DEVICES))
    c.add_argument("--no-progress", dest="no_progress", action="store_true")
    c.set_defaults(func=cmd_cache_latents)


def add_import_official_command(sub) -> None:
    i = sub.add_parser("import-official", help="convert a checkpoint of the authors' public "
                                               "code to this library's format")
    i.add_argument("checkpoint", type=user_path,
                   help="their .pt/.pth (state dict or training checkpoint with "
                        "model/ema; both are converted, ema is what sampling uses) or "
                        ".safetensors")
    i.add_argument("--config", type=user_path, default=None,
                   help="their YAML (default: the one *.yaml of their experiment folder, "
                        "EXP/*.yaml for EXP/checkpoints/NNNNNNN.pt, as their sampler finds it)")
    i.add_argument("out", type=user_path,
                   help="directory for the converted run (OUT/checkpoints/step_00000000)")
    i.add_argument("overrides", nargs="*", help="dotted overrides of our config, e.g. "
                                                "data.path=DIR (a latent cache to fine-tune on)")
    i.add_argument("--trust-pickle", dest="trust_pickle", action="store_true",
                   help="load a checkpoint holding Python objects (only for files you trust)")
    i.add_argument("--vae", default=None, metavar="DIR",
                   help="a local diffusers AutoencoderKL folder (their runs: sd-vae-ft-mse) that "
                        "decodes the imported model's samples (default: their basic.vae_path "
                        "if it is a local folder; else sampling asks for --vae)")
    i.set_defaults(func=cmd_import_official)


def add_export_official_command(sub) -> None:
    x = sub.add_parser("export-official", help="write a run as an experiment folder of the "
                                               "authors' public code (their keys and YAML)")
    x.add_argument("run", type=user_path,
                   help="run directory (its newest checkpoint) or checkpoint directory")
    x.add_argument("out", type=user_path, help="new experiment folder: OUT/config.yaml and "
                               "OUT/checkpoints/NNNNNNN.pt holding model and ema")
    x.set_defaults(func=cmd_export_official)


def add_train_command(sub) -> None:
    t = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train a model from a YAML config and key=value overrides. "
                                   "Every config key, with its type, default and meaning: "
                                   "diffmoe config --list (docs/config.md).")
    t.add_argument("config", type=user_path, help="YAML config, e.g. configs/mnist_diffmoe.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.moe.num_experts=8")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in train.out_dir from its newest intact checkpoint")
    t.add_argument("--accept-changes", dest="accept_changes", action="store_true",
                   help="with --resume: train on with optimisation settings (train.lr, "
                        "train.batch_size, ...) other than the checkpoint's; each config the "
                        "run was trained under is kept in train.out_dir/config_history")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=cmd_train)


def add_config_command(sub) -> None:
    c = sub.add_parser("config", help="list every config key with its type, default and meaning",
                       description="Every key a config file or a key=value override may set, "
                                   "read from the config dataclasses and their comments.")
    c.add_argument("--list", action="store_true", required=True,
                   help="list the keys (with SECTION_OR_KEY, only those under it)")
    c.add_argument("under", nargs="?", default="", metavar="SECTION_OR_KEY",
                   help="e.g. train, model.moe or train.lr (default: every key)")
    c.add_argument("--format", choices=list(FORMATS), default="text",
                   help="text for a terminal (default), or markdown (docs/config.md)")
    c.set_defaults(func=cmd_config)


def add_sample_command(sub) -> None:
    s = sub.add_parser("sample", help="generate a PNG grid from a checkpoint, a run directory or "
                                      "a folder written by save_pretrained",
                       description="Options left out take their values from the sample section "
                                   "of the checkpoint's config.")
    add_sampling_args(s, with_num=True)
    s.add_argument("--prompt", action="append", default=None,
                   help="text-to-image checkpoints: what to draw; repeat for several prompts "
                        "(one grid row each)")
    s.add_argument("--out", type=user_path, default="samples.png",
                   help="output PNG (a JSON summary goes beside)")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.add_argument("--vae", default=None, metavar="DIR",
                   help="latent models: the diffusers AutoencoderKL folder that decodes the "
                        "samples (default: a folder's vae/, else the VAE its config or latent "
                        "cache names)")
    s.add_argument("--judge", action="store_true",
                   help="MNIST-shaped class-conditional models: also report the share of "
                        "samples the packaged MNIST classifier reads as their label (class "
                        "consistency; in the log and the JSON summary)")
    s.set_defaults(func=cmd_sample)


def add_eval_command(sub) -> None:
    e = sub.add_parser("eval", help="FID/KID/precision/recall and capacity of a checkpoint",
                       description="Generates --num samples, streams them through the FID "
                                   "Inception and writes one JSON. Sampling options left out "
                                   "come from the checkpoint's sample config. Inception Score "
                                   "is not available with the packaged Inception (no logits).")
    add_sampling_args(e, with_num=False)
    e.add_argument("--num", type=int, default=None, help="samples to generate (default 500)")
    add_metric_args(e)
    e.add_argument("--save-npz", dest="save_npz", type=user_path, default=None,
                   help="also save the samples as an ADM-style .npz (arr_0 images, arr_1 labels)")
    e.add_argument("--out", type=user_path, default=None,
                   help="results JSON (default <run>/eval/<step>/eval.json)")
    e.add_argument("--force", action="store_true", help="replace existing outputs")
    e.add_argument("--per-category", dest="per_category", type=int, default=8,
                   help="text-to-image: prompts per GenEval category (default 8)")
    e.add_argument("--samples-per-prompt", dest="samples_per_prompt", type=int, default=4,
                   help="text-to-image: images per prompt (default 4)")
    e.add_argument("--categories", nargs="+", default=list(CATEGORY_NAMES), metavar="CATEGORY",
                   help="text-to-image: the GenEval categories to judge (default all six: "
                        + ", ".join(CATEGORY_NAMES) + ")")
    e.add_argument("--no-fid", dest="no_fid", action="store_true",
                   help="text-to-image: judge only, skip FID against the shapes test split")
    e.set_defaults(func=cmd_eval)


def add_sweep_command(sub) -> None:
    w = sub.add_parser("sweep-thresholds", help="interval search over constant thresholds "
                                                "(Eq. 16): FID vs C_avg table and PNG")
    add_sampling_args(w, with_num=False)
    w.add_argument("--num", type=int, default=100, help="samples per row (default 100)")
    w.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
                   help="constant thresholds gamma to try")
    w.add_argument("--budget", type=float, default=1.0,
                   help="pick the best FID with C_avg_infer <= this (default 1)")
    add_metric_args(w)
    w.add_argument("--out", type=user_path, default=None,
                   help="output directory (default <run>/eval/<step>/sweep)")
    w.add_argument("--force", action="store_true", help="replace existing outputs")
    w.set_defaults(func=cmd_sweep)


def add_analyze_command(sub) -> None:
    a = sub.add_parser("analyze", help="PNG plots: capacity vs timestep, expert load, capacity "
                                       "by class, C_avg vs sampling batch size")
    add_sampling_args(a, with_num=False)
    a.add_argument("--num", type=int, default=100, help="samples for the main run (default 100)")
    a.add_argument("--batch-sizes", dest="batch_sizes", type=int, nargs="+",
                   default=list(DEFAULT_BATCH_SIZES), help="sampling batch sizes to compare")
    a.add_argument("--num-per-batch-size", dest="num_per_batch_size", type=int, default=32,
                   help="samples per batch-size run (default 32)")
    a.add_argument("--out", type=user_path, default=None,
                   help="output directory (default <run>/analysis/<step>)")
    a.add_argument("--force", action="store_true", help="replace existing outputs")
    a.add_argument("--no-progress", dest="no_progress", action="store_true")
    a.set_defaults(func=cmd_analyze)


def add_fid_command(sub) -> None:
    f = sub.add_parser("fid", help="FID/KID/precision/recall between two image sets",
                       description="Each set is DATASET[:SPLIT][:N], folder:DIR[:N] or an ADM "
                                   ".npz, e.g. diffmoe fid mnist:train:1000 mnist:test:1000")
    f.add_argument("first")
    f.add_argument("second")
    f.add_argument("--num", type=int, default=1000, help="images per dataset set without :N")
    f.add_argument("--image-size", dest="image_size", type=int, default=256,
                   help="side that folder:DIR images are centre-cropped to (default 256)")
    f.add_argument("--feature-batch", dest="feature_batch", type=int, default=50)
    f.add_argument("--cache-dir", dest="cache_dir", type=user_path, default=None)
    f.add_argument("--no-progress", dest="no_progress", action="store_true")
    f.set_defaults(func=cmd_fid)


COMMANDS = (add_train_command, add_config_command, add_sample_command, add_eval_command,
            add_sweep_command, add_analyze_command, add_fid_command, add_cache_latents_command,
            add_import_official_command, add_export_official_command, add_plan_command)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffmoe", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return p


def check_int_options(args: argparse.Namespace) -> None:
    """Every integer option of the command that is no sampling setting within its range
    (:mod:`diffmoe.config.ranges`; the sampling options are checked as their sample.* keys)."""
    options = {**OPTION_RANGES, **COMMAND_OPTION_RANGES.get(args.command, {})}
    for dest, (flag, limit) in options.items():
        value = getattr(args, dest, None)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int):
                check_int(flag, item, limit, sep=" ")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after the train options, so collect leftovers here.
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "import-official", "plan") and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.verbose)
    previous = _stop_on_sigterm()
    try:
        check_int_options(args)
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
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm():
    """Make SIGTERM (a scheduler, or torchrun stopping the other ranks) end the command with an
    ``error:`` line, as an error does, instead of silently; training replaces this with its
    own handler, which names the step. Returns the previous handler (None off the main
    thread, where signals cannot be handled)."""
    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # already ending: later ones change nothing
        raise DiffMoEError(f"stopped by {signal.Signals(signum).name} (the job was cancelled, "
                           f"or another rank failed)")

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, on_sigterm)


if __name__ == "__main__":
    sys.exit(main())
