"""``diffmoe plan``: one real-size training step and one sampling step of a config, simulated on
the CPU without the memory they need, so that a launch on GPUs is sized before it is made.

The config's own model is built and trained by the trainer's own step
(:meth:`diffmoe.train.Trainer.train_step`: objective, DiffMoE routing over its token pool,
predictor, loss, backward, optimizer, thresholds, EMA) on *fake tensors*
(``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices, no storage), under the config's
engine: one process, DDP, or FSDP2 sharded over a fake process group of ``--gpus`` ranks
(``torch.testing._internal.distributed.fake_pg``: collectives that move nothing), so what is
simulated is one rank's share. PyTorch's memory trackers
(``torch.distributed._tools``: ``MemTracker``, and ``FSDPMemTracker`` for FSDP2) follow every
tensor the step creates or frees and give the step's peak by category; torch's
``FlopCounterMode`` counts its matrix products.

What is measured is the steady state: one step is run first (counted for FLOPs), so that the
optimizer's moments exist, and the second is tracked. The same measurement runs on real tensors
(:func:`step_memory`), which is how ``tests/test_plan.py`` validates the simulation against real
runs of the same step. Fake tensors cannot run autograd on a ``cuda`` device in a CPU build of
torch, so the step is simulated on the CPU device: what a GPU adds on top (the caching
allocator's fragmentation, cuBLAS workspaces, the CUDA context, the NCCL buffers) is in
docs/performance.md, "Planning a launch".
"""

from __future__ import annotations

import contextlib
import logging
import time
import types
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

from .capacity import activated_params
from .config import Config
from .device import autocast
from .diffusion.samplers import guided_output
from .distributed import DistInfo
from .errors import ConfigError
from .models import build_model
from .models.moe import Routing, diffmoe_layers
from .models.moe.base import Choice
from .models.moe.diffmoe import DiffMoE, top_by_score

log = logging.getLogger(__name__)

GIB = 2**30
TRAINING_PASSES = 3  # Eq. 40's FLOPs: 2 per activated parameter and token forward, 4 backward
FLOPS_PER_PARAM = 2  # one multiply-add per parameter and token
# Dense peak FLOP/s of each chip (SXM data sheets): bf16 tensor cores, and TF32 for fp32 runs.
GPU_PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp32": 495e12},
    "H200": {"bf16": 989e12, "fp32": 495e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
}
DEFAULT_GPU = "H100"
DEFAULT_MFU = 0.4
# The share of a GPU's memory the plan keeps free of tensors: the CUDA context and kernels, the
# cuBLAS workspaces, NCCL's buffers and the caching allocator's fragmentation, none of which a
# CPU simulation sees (docs/performance.md, "Planning a launch", gives the figures behind it).
DEFAULT_HEADROOM = 0.1
MAX_GRAD_ACCUM = 64  # the largest grad_accum a suggestion goes to before giving up
# Memory categories, from the trackers' names of what a tensor is to the plan's.
CATEGORIES = {
    "Parameter": "parameters", "Sharded Param": "parameters",
    "Unsharded Param": "gathered_parameters",
    "Gradient": "gradients", "Sharded Grad": "gradients", "Unsharded Grad": "gathered_gradients",
    "Optstate": "optimizer", "OptState": "optimizer",
    "Activation": "activations", "Temp": "temporaries",
    "All Gather": "collectives", "Reduce Scatter": "collectives",
    "Buffer": "buffers", "Inputs": "inputs", "Other": "inputs",
}
CATEGORY_ORDER = ("parameters", "ema", "gradients", "optimizer", "activations", "temporaries",
                  "gathered_parameters", "gathered_gradients", "collectives", "buffers", "inputs")


def engine(cfg: Config, gpus: int) -> str:
    """single (one rank), ddp or fsdp: how ``diffmoe train`` would run ``cfg`` on ``gpus``."""
    return "single" if gpus == 1 else cfg.train.parallel


@dataclass
class StepPlan:
    """One simulated training step of a config on ``gpus`` ranks (figures per rank)."""

    config: str
    model: str
    gpus: int
    engine: str
    precision: str
    activation_checkpointing: bool
    grad_accum: int
    micro_batch: int  # images per rank and micro-batch: the DiffMoE token pool with token_pool=rank
    params: int
    peak_bytes: int
    peak_by_category: dict[str, int]
    flops_per_image: float  # forward + backward, counted (recomputation left out)
    flops_per_step: float  # every rank, one optimizer step
    activated_params: float  # Eq. 40, at the training capacity C
    activated_flops_per_image: float  # 6 · activated parameters · tokens (Eq. 40)
    gpu: str
    mfu: float
    step_time_s: float  # flops_per_step / gpus / (mfu · the chip's peak at this precision)
    sampling: dict = field(default_factory=dict)
    gpu_memory_gib: Optional[float] = None
    headroom: float = DEFAULT_HEADROOM  # of gpu_memory_gib, kept free of tensors
    fits: Optional[bool] = None
    suggestion: Optional[dict] = None
    simulated_s: float = 0.0

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def to_dict(self) -> dict:
        out = asdict(self)
        out["peak_gib"] = self.peak_gib
        out["peak_gib_by_category"] = {k: v / GIB for k, v in self.peak_by_category.items()}
        return out


# -- checks -------------------------------------------------------------------------------------

def check_plannable(cfg: Config, gpus: int) -> None:
    """Refuse, in one line, what the simulation cannot run."""
    t = cfg.train
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: give the number of GPUs (ranks) to plan for, 1 or more")
    if cfg.model.condition == "text":
        raise ConfigError("diffmoe plan simulates class-conditional models only; this config is "
                          "text-conditioned (model.condition=text), which it cannot simulate")
    if t.compile:
        raise ConfigError("diffmoe plan cannot simulate a compiled step (train.compile=true); "
                          "plan with train.compile=false (compiling changes the temporaries, "
                          "not the states or the activations saved)")
    if t.batch_size % (gpus * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by --gpus {gpus} x "
                          f"train.grad_accum={t.grad_accum}; pick a multiple of their product")
    if cfg.model.moe.type == "token_choice":
        raise ConfigError("diffmoe plan cannot simulate token choice (model.moe.type="
                          "token_choice): how many tokens each expert takes depends on the "
                          "weights, which fake tensors do not have")
    if gpus > 1 and t.token_pool == "global" and cfg.model.moe.type == "diffmoe":
        raise ConfigError("diffmoe plan cannot simulate train.token_pool=global on several GPUs: "
                          "each rank's share of the pool depends on the weights; plan with "
                          "train.token_pool=rank (the same weights, gradients and optimizer "
                          "state, and activations of about the same size)")
    if dist.is_available() and dist.is_initialized():
        raise ConfigError("diffmoe plan simulates its own process group; run it outside torchrun")


# -- the step ------------------------------------------------------------------------------------

class RandomBatches:
    """Stands in for the data: each call gives a per-rank batch of standard-normal inputs and
    random labels, as fake tensors inside a ``FakeTensorMode`` and real ones outside it."""

    def __init__(self, cfg: Config, batch: int, device: torch.device = torch.device("cpu")):
        m = cfg.model
        self.shape = (batch, m.in_channels, m.input_size, m.input_size)
        self.num_classes = m.num_classes
        self.device = device

    def next(self) -> tuple[Tensor, Tensor]:
        return (torch.randn(self.shape, device=self.device),
                torch.randint(0, self.num_classes, self.shape[:1], device=self.device))


class _PeakTracker:
    """The trackers' global peak only: their per-module peak update walks every module on
    every operation (the simulation's main cost: about 9 of 14 s for DiffMoE-B-E16's forward
    and backward); the plan reads only the step's peak and its categories."""

    def _update_peak_stats(self, peak_state) -> None:  # overrides MemTracker's
        for device, snap in self._curr_mem_snap.items():
            total = snap["Total"]
            if self._peak_mem.get(device, 0) < total:
                self._peak_mem[device] = total
                self._peak_mem_snap[device] = dict(snap)


def _tracker(trainer):
    """PyTorch's memory tracker for ``trainer``'s step: FSDP2's (which knows the sharded and
    gathered parameters and its collectives' buffers), or the plain one given the model and the
    optimizer made before it."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    if trainer.model.fsdp:
        return type("PeakFSDPMemTracker", (_PeakTracker, FSDPMemTracker), {})(
            trainer.model.module, trainer.optimizer)
    tracker = type("PeakMemTracker", (_PeakTracker, MemTracker), {})()
    tracker.track_external(trainer.model.module, trainer.optimizer)
    return tracker


def _local_bytes(module: torch.nn.Module) -> int:
    """This rank's bytes of a module's parameters and buffers (its shards under FSDP2)."""
    tensors = [getattr(t, "_local_tensor", t) for t in (*module.parameters(), *module.buffers())]
    return sum(t.untyped_storage().nbytes() for t in tensors)


def step_memory(trainer) -> dict[str, int]:
    """One training step of ``trainer`` (:meth:`~diffmoe.train.Trainer.train_step`) under
    PyTorch's memory tracker: this rank's peak tensor bytes by category (``CATEGORY_ORDER``),
    with ``total``. The EMA copy is resident through the step and changed in place, so its
    bytes are a category of their own, added to every moment of the step; so are DDP's gradient
    buckets. Runs on fake or real tensors alike."""
    tracker = _tracker(trainer)

    root = trainer.model.net

    def next_micro_batch(module, inputs) -> None:
        # The trackers refuse a second forward of the root module in one tracked step ("multiple
        # iterative calls"), which is the next micro-batch under gradient accumulation: its
        # per-module statistics (which the plan does not read) start again. A global hook made
        # before the tracker's runs before its hooks.
        if module is root:
            tracker.memory_tracking.pop(module, None)

    hook = register_module_forward_pre_hook(next_micro_batch)
    try:
        with tracker:
            trainer.train_step()
    finally:
        hook.remove()
    peak = tracker.get_tracker_snapshot("peak")
    snap = next(iter(peak.values()), {}) if peak else {}
    out = dict.fromkeys(CATEGORY_ORDER, 0)
    for key, nbytes in snap.items():
        if key != "Total":
            out[CATEGORIES[str(key.value)]] += nbytes
    out["ema"] = _local_bytes(trainer.ema)
    if trainer.dist.enabled and not trainer.model.fsdp:
        # DDP keeps every gradient in its all-reduce buckets (the gradients are views into
        # them) from its construction on: resident, like the EMA.
        out["gradients"] = sum(p.untyped_storage().nbytes()
                               for p in trainer.model.module.parameters() if p.requires_grad)
    out["total"] = sum(out.values())
    return out


def _sdpa_flops() -> dict:
    """The CPU's fused attention, which torch's FLOP counter does not count: its products are
    those of the other fused kernels (counted as theirs)."""
    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop.__wrapped__,
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                sdpa_backward_flop.__wrapped__}


def counted_step_flops(trainer) -> float:
    """This rank's model FLOPs of one training step (forward + backward; activation
    checkpointing's recomputation left out, as model FLOPs leave it out)."""
    module = trainer.model.module
    recompute, module.activation_checkpointing = module.activation_checkpointing, False
    try:
        with FlopCounterMode(display=False, custom_mapping=_sdpa_flops()) as counter:
            trainer.train_step()
    finally:
        module.activation_checkpointing = recompute
    return float(counter.get_total_flops())


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[DistInfo]:
    """A fake process group of ``world_size`` ranks, as rank 0 (nothing without one rank)."""
    if world_size == 1:
        yield DistInfo()
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield DistInfo(0, world_size, 0, 0)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def fake_tensors() -> Iterator[None]:
    """A ``FakeTensorMode`` in which a module can be deep-copied (the EMA is one): a fake
    tensor's copy would otherwise get a fake mode of its own, which torch refuses to mix."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    had = "__deepcopy__" in vars(FakeTensorMode)
    FakeTensorMode.__deepcopy__ = lambda self, memo: self
    try:
        with mode, warnings.catch_warnings():
            # Tensor.__deepcopy__ asks for the data pointer, which a fake tensor has not.
            warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
            yield
    finally:
        if not had:
            del FakeTensorMode.__deepcopy__


def simulate_training(cfg: Config, gpus: int) -> tuple[dict[str, int], float, int]:
    """One rank's peak memory by category and the FLOPs of one training step of ``cfg`` on
    ``gpus`` ranks, on fake tensors, and the parameter count."""
    from .train import step_trainer

    cpu = replace(cfg, train=replace(cfg.train, device="cpu"))
    per_rank = cfg.train.batch_size // gpus
    with fake_process_group(gpus) as info:
        # The mesh holds real rank numbers: made before the fake tensors.
        mesh = init_device_mesh("cpu", (gpus,)) if engine(cfg, gpus) == "fsdp" else None
        with fake_tensors():
            # DDP's reducer cannot be built on fake tensors: a DDP rank runs as one process at
            # the rank's batch, and step_memory adds DDP's gradient buckets (tests/test_plan.py
            # checks this against real 2-rank DDP steps).
            trainer = step_trainer(cpu, info, torch.device("cpu"), RandomBatches(cpu, per_rank),
                                   mesh=mesh, ddp=False)
            memory, flops = measure(trainer)
            params = trainer.model.module.num_params()
    return memory, flops, params


def measure(trainer) -> tuple[dict[str, int], float]:
    """Training steps of ``trainer`` to the steady state: the first counted for FLOPs (and
    creating the optimizer's moments), the last tracked for memory (:func:`step_memory`). The
    same on fake tensors (the plan) and real ones (its validation)."""
    trainer.model.net.train()
    flops = counted_step_flops(trainer)
    if trainer.model.ddp is not None:
        trainer.train_step()  # DDP rebuilds its gradient buckets in its second forward, once
    return step_memory(trainer), flops


# -- sampling ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _fixed_dynamic_counts(layers: list[DiffMoE], capacity: float) -> Iterator[None]:
    """Dynamic routing with k_e = S·C/E tokens for every expert: on fake tensors the counts of
    Eq. 14 (which depend on the weights) cannot be read, so each layer's ``dynamic_choice``
    takes these instead (each expert its top k_e tokens by router score, as Eq. 14's rule)."""
    def choose(self, scores_SE, predicted_SE, batch):
        k = int(scores_SE.shape[0] * capacity / self.num_experts)
        counts = [k] * self.num_experts
        tok_T, w_T = top_by_score(scores_SE, counts)
        counts_E = torch.full((self.num_experts,), k, dtype=torch.long, device=scores_SE.device)
        return Choice(tok_T, w_T, counts_E, counts)

    for layer in layers:
        layer.dynamic_choice = types.MethodType(choose, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.dynamic_choice


def simulate_sampling(cfg: Config, capacity: float) -> dict:
    """One model call of a sampling step at ``sample.batch_size`` (both halves of classifier-
    free guidance as one batch where ``sample.cfg_scale`` is not 1), dynamic routing for a
    DiffMoE model at capacity ``capacity``: peak memory and FLOPs, on fake tensors."""
    from torch.distributed._tools.mem_tracker import MemTracker

    s, m = cfg.sample, cfg.model
    with fake_tensors():
        model = build_model(m).eval()
        layers = diffmoe_layers(model)
        routing = Routing("dynamic") if layers else None
        z = torch.randn(s.batch_size, m.in_channels, m.input_size, m.input_size)
        y = torch.randint(0, m.num_classes, (s.batch_size,))
        model_t = torch.full((s.batch_size,), 0.5 * cfg.objective.time_scale)
        tracker = type("PeakMemTracker", (_PeakTracker, MemTracker), {})()
        tracker.track_external(model)
        guided = s.guidance_channels or m.in_channels
        with torch.no_grad(), _fixed_dynamic_counts(layers, capacity), tracker, \
                FlopCounterMode(display=False, custom_mapping=_sdpa_flops()) as counter, \
                autocast(s.precision, torch.device("cpu")):
            guided_output(model, z, model_t, y, s.cfg_scale, routing, guided, 0.5)
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    tokens = (m.input_size // m.patch_size) ** 2
    images = s.batch_size * (1 if s.cfg_scale == 1.0 else 2)
    return {"batch_size": s.batch_size, "cfg_scale": s.cfg_scale,
            "mode": "dynamic" if layers else "dense" if m.moe.type == "dense" else "static",
            "capacity": capacity,
            "peak_bytes": int(peak), "peak_gib": peak / GIB,
            "flops_per_call": float(counter.get_total_flops()),
            "activated_flops_per_call": FLOPS_PER_PARAM * images * tokens
            * activated_params(model, capacity)}


# -- the plan ------------------------------------------------------------------------------------

def _with(cfg: Config, changes: dict) -> Config:
    return replace(cfg, train=replace(cfg.train, **changes))


def plan_step(cfg: Config, name: str, gpus: int, *, gpu: str = DEFAULT_GPU,
              mfu: float = DEFAULT_MFU) -> StepPlan:
    """One training step of ``cfg`` on ``gpus`` ranks, simulated (no sampling, no advice)."""
    start = time.perf_counter()
    check_plannable(cfg, gpus)
    t = cfg.train
    memory, flops, params = simulate_training(cfg, gpus)
    per_rank = t.batch_size // gpus
    with fake_tensors():
        model = build_model(cfg.model, t.token_pool)
        active = activated_params(model, cfg.model.moe.capacity)
    tokens = (cfg.model.input_size // cfg.model.patch_size) ** 2
    peak = memory.pop("total")
    return StepPlan(
        config=name, model=cfg.model.preset or cfg.model.moe.type, gpus=gpus,
        engine=engine(cfg, gpus), precision=t.precision,
        activation_checkpointing=t.activation_checkpointing, grad_accum=t.grad_accum,
        micro_batch=per_rank // t.grad_accum, params=params, peak_bytes=peak,
        peak_by_category=memory, flops_per_image=flops / per_rank, flops_per_step=flops * gpus,
        activated_params=active,
        activated_flops_per_image=TRAINING_PASSES * FLOPS_PER_PARAM * tokens * active,
        gpu=gpu, mfu=mfu, step_time_s=flops / (mfu * GPU_PEAK_FLOPS[gpu][t.precision]),
        simulated_s=time.perf_counter() - start)


def candidate_changes(cfg: Config, gpus: int) -> Iterator[dict]:
    """Changes of the training settings that lower the peak, fewest first, and among as many
    those that depart least from the paper's recipe first: activation checkpointing (the same
    computation, a third more of it), FSDP2 (the same computation, sharded states), bf16
    (other rounding), then a smaller micro-batch with ``grad_accum`` (with ``token_pool=rank``
    a smaller DiffMoE token pool)."""
    t = cfg.train
    toggles = []
    if not t.activation_checkpointing:
        toggles.append({"activation_checkpointing": True})
    if gpus > 1 and t.parallel != "fsdp":
        toggles.append({"parallel": "fsdp"})
    if t.precision != "bf16":
        toggles.append({"precision": "bf16"})
    subsets = [{}]
    for toggle in toggles:
        subsets += [{**s, **toggle} for s in subsets]
    subsets.sort(key=len)
    per_rank = t.batch_size // gpus
    accums = [a for a in (2 ** i for i in range(1, MAX_GRAD_ACCUM.bit_length()))
              if a > t.grad_accum and per_rank % a == 0]
    for size in range(1, len(toggles) + 2):
        yield from (subset for subset in subsets if len(subset) == size)
        for subset in subsets:
            if len(subset) == size - 1:
                yield from ({**subset, "grad_accum": accum} for accum in accums)


def advise(cfg: Config, name: str, gpus: int, limit_bytes: float, **kwargs) -> Optional[dict]:
    """The first of :func:`candidate_changes` whose simulated peak fits ``limit_bytes``:
    the overrides and the peak with them (None if none fits). A smaller micro-batch only lowers
    the peak, so a set of other changes is tried with accumulation only if it fits at the
    largest ``grad_accum``, and none is tried with accumulation if every change at once does
    not fit."""
    peaks: dict[tuple, int] = {}

    def peak(changes: dict) -> int:
        key = tuple(sorted(changes.items()))
        if key not in peaks:
            log.info("plan: trying %s", " ".join(f"train.{k}={v}" for k, v in key))
            peaks[key] = plan_step(_with(cfg, changes), name, gpus, **kwargs).peak_bytes
        return peaks[key]

    candidates = list(candidate_changes(cfg, gpus))
    largest = {}  # the toggles of each set with accumulation -> its largest grad_accum
    for changes in candidates:
        if "grad_accum" in changes:
            toggles = tuple(sorted((k, v) for k, v in changes.items() if k != "grad_accum"))
            largest[toggles] = max(largest.get(toggles, 0), changes["grad_accum"])
    every = max(candidates, key=lambda c: (len(c), c.get("grad_accum", 0)), default=None)
    for changes in candidates:
        if "grad_accum" in changes:
            if peak(every) > limit_bytes:
                return None
            toggles = tuple(sorted((k, v) for k, v in changes.items() if k != "grad_accum"))
            if peak({**dict(toggles), "grad_accum": largest[toggles]}) > limit_bytes:
                continue
        if peak(changes) <= limit_bytes:
            return {"overrides": {f"train.{k}": v for k, v in changes.items()},
                    "peak_gib": peak(changes) / GIB}
    return None


def plan(cfg: Config, name: str, gpus: int = 1, *, gpu_memory_gib: Optional[float] = None,
         headroom: float = DEFAULT_HEADROOM, gpu: str = DEFAULT_GPU, mfu: float = DEFAULT_MFU,
         capacity: float = 1.0) -> StepPlan:
    """``diffmoe plan``: the training step, the sampling step at ``capacity``, and where the
    peak exceeds ``gpu_memory_gib`` less its ``headroom``, the smallest change that fits."""
    if gpu not in GPU_PEAK_FLOPS:
        raise ConfigError(f"--gpu {gpu}: not a GPU whose peak is known; use one of "
                          f"{', '.join(GPU_PEAK_FLOPS)}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: give a utilisation between 0 and 1, e.g. 0.4")
    if capacity <= 0:
        raise ConfigError(f"--capacity {capacity}: give the average capacity C > 0, e.g. 1")
    if gpu_memory_gib is not None and gpu_memory_gib <= 0:
        raise ConfigError(f"--gpu-memory {gpu_memory_gib}: give the GPU's memory in GiB, e.g. 80")
    if not 0 <= headroom < 1:
        raise ConfigError(f"--headroom {headroom}: give the share of the GPU's memory to keep "
                          f"free, between 0 and 1, e.g. {DEFAULT_HEADROOM}")
    start = time.perf_counter()
    step = plan_step(cfg, name, gpus, gpu=gpu, mfu=mfu)
    step.sampling = simulate_sampling(cfg, capacity)
    if gpu_memory_gib is not None:
        usable = gpu_memory_gib * (1 - headroom) * GIB
        step.gpu_memory_gib, step.headroom = gpu_memory_gib, headroom
        step.fits = step.peak_bytes <= usable
        if not step.fits:
            step.suggestion = advise(cfg, name, gpus, usable, gpu=gpu, mfu=mfu)
    step.simulated_s = time.perf_counter() - start
    return step


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.2f} MiB"


def _flops(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP" if flops >= 1e13 else f"{flops / 1e9:.4g} GFLOP"


def report(p: StepPlan) -> str:
    """The plan in words, for a terminal."""
    lines = [
        f"{p.model}: {p.params / 1e6:,.1f}M parameters ({p.config})",
        f"training step: {p.gpus} GPU(s), {p.engine}, {p.precision}, activation checkpointing "
        f"{'on' if p.activation_checkpointing else 'off'}, micro-batch {p.micro_batch} x "
        f"grad_accum {p.grad_accum} per GPU",
        f"peak memory per GPU: {_size(p.peak_bytes)} (simulated on the CPU; see "
        f"docs/performance.md for what a GPU adds)",
    ]
    for key in CATEGORY_ORDER:
        if p.peak_by_category.get(key):
            lines.append(f"  {key:20s} {_size(p.peak_by_category[key]):>12s}")
    lines += [
        f"FLOPs: {_flops(p.flops_per_image)} per image (forward + backward, counted), "
        f"{_flops(p.flops_per_step)} per step; Eq. 40 (6 x {p.activated_params / 1e6:.3g}M "
        f"activated parameters x tokens): {_flops(p.activated_flops_per_image)} per image",
        f"step time at {p.mfu:.0%} MFU of an {p.gpu} "
        f"({GPU_PEAK_FLOPS[p.gpu][p.precision] / 1e12:.0f} TFLOP/s {p.precision} peak): "
        f"{p.step_time_s * 1e3:.3g} ms",
    ]
    if p.sampling:
        s = p.sampling
        lines.append(
            f"sampling step ({s['mode']}, C = {s['capacity']:g}, batch {s['batch_size']}, cfg "
            f"{s['cfg_scale']:g}): peak {_size(s['peak_bytes'])}, {_flops(s['flops_per_call'])} "
            f"per model call (Eq. 40: {_flops(s['activated_flops_per_call'])})")
    if p.fits is not None:
        usable = p.gpu_memory_gib * (1 - p.headroom)
        lines.append(f"fits {p.gpu_memory_gib:g} GiB per GPU ({usable:g} GiB for tensors, "
                     f"{p.headroom:.0%} kept free): {'yes' if p.fits else 'no'}")
    if p.fits is False:
        s = p.suggestion
        lines.append("nothing fits, not even every change at once (activation checkpointing, "
                     "FSDP2 on several GPUs, bf16 and the smallest micro-batch with grad_accum)"
                     if s is None else
                     "smallest change that fits: "
                     + " ".join(f"{k}={str(v).lower()}" for k, v in s["overrides"].items())
                     + f" (peak {_size(s['peak_gib'] * GIB)})")
    lines.append(f"simulated in {p.simulated_s:.0f} s")
    return "\n".join(lines)
