"""Data-parallel training: the model handle the trainer drives (:class:`TrainingModel`: the raw
module, plus the DDP / FSDP2 / compiled wrapper that runs its forward), FSDP2 sharding, the state
dicts of checkpoints, and gradient synchronisation across micro-batches.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each DiT block and then the root module, so
parameters become DTensors split over ranks along dim 0 and each block's weights are gathered
just for its forward and backward. The EMA model is sharded the same way, so its update is a
local lerp of shards. Under torchrun checkpoints are sharded (:func:`sharded_parts`,
:func:`load_sharded`): each rank writes and reads only its shards, keyed by parameter name with
global shapes, so a run resumes under another engine or world size. Full (unsharded) state dicts
load checkpoints of one file (a single process's, or those written before sharding) into a
sharded model.

The model is built on the ``meta`` device (:func:`build_on_meta`: shapes, no storage), sharded,
then filled (:func:`materialize`): each rank allocates only what it holds (its FSDP2 shards; under
DDP and in one process the whole model, directly on the training device) and takes its values
from the model's initialisation plan (:mod:`diffmoe.models.init`), one whole tensor at a time on
the CPU, so that the weights are bit for bit those of the model built whole on the CPU from the
same seed, and no rank ever holds the whole model in host memory.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from .checkpoint import SHARDED_PARTS, LoadedCheckpoint, load_state_dict_checked
from .models.init import tensor_of

FULL_EVERYWHERE = StateDictOptions(full_state_dict=True)  # every rank passes the full tensors


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


Draw = Callable[[], Any]  # one random draw of a constructor, made again on the CPU generator


class _RandomDraws(TorchDispatchMode):
    """Records the random ops run under it: on the ``meta`` device they draw nothing, and each
    record makes its draw again, on a CPU tensor of the same shape (what the op consumes of the
    generator depends on the op and the shape only)."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[Draw] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.draws.append(_cpu_draw(func, args, kwargs))
        return func(*args, **kwargs)


def _cpu_draw(func, args: tuple, kwargs: dict) -> Draw:
    first, rest = args[0], args[1:]
    if kwargs.get("generator") is not None or any(
            isinstance(a, torch.Tensor) for a in (*rest, *kwargs.values())):
        raise RuntimeError(f"{func} draws with a generator or from tensors of its own, which a "
                           f"model built on the meta device cannot draw again")
    if isinstance(first, torch.Tensor):  # in place: uniform_, normal_, ...
        shape, dtype = tuple(first.shape), first.dtype
        return lambda: func(torch.empty(shape, dtype=dtype), *rest, **kwargs)
    return lambda: func(*args, **dict(kwargs, device=torch.device("cpu")))  # a factory: randn


def build_on_meta(build: Callable[[], nn.Module]) -> tuple[nn.Module, list[Draw]]:
    """``build()`` on the ``meta`` device (no storage), with the random draws its constructors
    would have made, for :func:`materialize` to make again. ``build`` must not initialise the
    weights itself (``build_model(..., initialize=False)``): that is the plan's work."""
    recorder = _RandomDraws()
    with torch.device("meta"), recorder:
        module = build()
    return module, recorder.draws


@torch.no_grad()
def materialize(module: nn.Module, draws: list[Draw], device: torch.device) -> None:
    """Give ``module`` (from :func:`build_on_meta`, sharded or not) storage on ``device``, only
    for what this rank holds, and its initial values: the constructors' ``draws`` made again on
    the CPU generator as it stands, then ``module.init_plan()`` run on one whole tensor at a time
    on the CPU, this rank keeping its shard. Seeded as before building, the values are bit for
    bit those of the module built whole on the CPU."""
    plan = module.init_plan()
    planned = {name for name, _ in plan}
    unset = [name for name, _ in itertools.chain(module.named_parameters(),
                                                 module.named_buffers()) if name not in planned]
    if unset:
        raise RuntimeError(f"{type(module).__name__}.init_plan leaves {unset[:3]} without a value")
    module.to_empty(device=device)
    for draw in draws:
        draw()
    for name, init in plan:
        target = tensor_of(module, name)
        whole = torch.empty(target.shape, dtype=target.dtype)
        init(whole)
        _keep_own_part(target, whole)


def _keep_own_part(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Write what this rank holds of the tensor ``whole`` into ``target`` (its shard of a
    DTensor; else all of it)."""
    if isinstance(target, DTensor):
        mine = distribute_tensor(whole.to(target.device), target.device_mesh, target.placements,
                                 src_data_rank=None)
        _local(target).copy_(mine.to_local())
    else:
        target.copy_(whole)


@torch.no_grad()
def materialize_as(dst: nn.Module, src: nn.Module, device: torch.device) -> None:
    """Give ``dst`` (from :func:`build_on_meta`, of ``src``'s structure and sharding: the EMA of
    the model) storage on ``device`` and the values of ``src``, each rank copying what it
    holds."""
    dst.to_empty(device=device)
    for a, b in zip(itertools.chain(dst.parameters(), dst.buffers()),
                    itertools.chain(src.parameters(), src.buffers())):
        _local(a).copy_(_local(b))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def shard(model: nn.Module, precision: str = "fp32", reduce_dtype: str = "fp32",
          mesh: Optional[DeviceMesh] = None) -> nn.Module:
    """FSDP2: one unit per DiT block, then the root (embedders, final layer). With ``precision``
    bf16 the parameters are gathered for the forward and backward in bf16 and the gradients
    reduced in ``reduce_dtype``; the sharded parameters and the optimizer stay fp32. The
    forward's inputs are not cast (``cast_forward_inputs=False``): the timestep, the condition
    and the residual stream enter every unit as they are, fp32, and bf16 autocast (which the
    forward must run under, as the trainer and sampler do) casts at each matmul, as it does
    under DDP. FSDP2's default would cast them to bf16 at the root, where ``1000·t`` has steps
    of 4 above 512. ``mesh``: the ranks to shard over (default: every rank of the process
    group)."""
    policy = MixedPrecisionPolicy()
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                      reduce_dtype=DTYPES[reduce_dtype],
                                      cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def load_full_model_state(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], None]:
    """A loader of full tensors (present on every rank) into a sharded model."""
    def load(tensors: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(model, tensors, options=FULL_EVERYWHERE)
    return load


def _param_ids(model: nn.Module) -> dict[str, int]:
    # The optimizer was built from model.parameters(): its ids follow this order.
    return {name: i for i, (name, _) in enumerate(model.named_parameters())}


def sharded_parts(model: nn.Module, ema: nn.Module,
                  optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """What a sharded checkpoint holds (:func:`diffmoe.checkpoint.save_sharded_checkpoint`):
    the weights, the EMA and the optimizer state keyed by parameter name, as this rank holds
    them (its shards under FSDP2, whole tensors under DDP, which DCP writes once)."""
    return dict(zip(SHARDED_PARTS, (get_model_state_dict(model), get_model_state_dict(ema),
                                    get_optimizer_state_dict(model, optimizer))))


def load_sharded(ckpt: LoadedCheckpoint, model: nn.Module, ema: nn.Module,
                 optimizer: torch.optim.Optimizer) -> None:
    """Restore :func:`sharded_parts` from a sharded checkpoint, whatever engine and world size
    wrote it: each rank reads what its shards need (collective under torchrun). Parameters the
    checkpoint has no optimizer state for (never given a gradient) are left without one, as in
    the run that wrote it."""
    for name, target in (("model", model), ("ema", ema)):
        def load(_, name=name, target=target) -> None:
            tensors = get_model_state_dict(target)
            ckpt.read_into(name, tensors)
            set_model_state_dict(target, tensors)
        load_state_dict_checked(target, ckpt.shapes(name), f"'{ckpt.path}' ({name})", load)
    state = get_optimizer_state_dict(model, optimizer)  # AdamW's state made, to be filled
    ckpt.read_into("optimizer", state, partial=True)
    # Keys "state.<parameter name>.<exp_avg | exp_avg_sq | step>"
    saved = {key.removeprefix("state.").rsplit(".", 1)[0]
             for key in ckpt.shapes("optimizer") if key.startswith("state.")}
    state["state"] = {name: st for name, st in state["state"].items() if name in saved}
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(strict=False))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state_dict: dict) -> None:
    """Load an index-keyed full optimizer state (on every rank) into a sharded model's
    optimizer."""
    names = list(_param_ids(model))
    state = {names[int(i)]: st for i, st in state_dict["state"].items()}
    groups = [dict(g, params=[names[int(i)] for i in g["params"]])
              for g in state_dict["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=FULL_EVERYWHERE)


class TrainingModel:
    """The model being trained, as one handle.

    ``module`` is the raw :class:`~diffmoe.models.DiT` (its parameters, buffers and state dict:
    what the optimizer, the EMA, the threshold update and checkpoints use); ``net`` runs the
    training forward (``module`` itself, or its DDP wrapper, either optionally compiled: see
    :meth:`wrap`). Under FSDP2 ``module`` is sharded in place and is its own ``net``.

    DDP buffers are not broadcast: DiffMoE's thresholds are averaged explicitly after each step
    (:func:`diffmoe.models.moe.apply_threshold_updates`).
    """

    def __init__(self, module: nn.Module, fsdp: bool):
        self.module = module
        self.fsdp = fsdp
        self.ddp: Optional[DistributedDataParallel] = None
        self.net: Optional[nn.Module] = module

    def wrap(self, *, ddp: bool, compile: bool, device: torch.device,
             bf16_grads: bool = False) -> None:
        """Run the forward through DDP (``ddp``) and/or ``torch.compile`` (``compile``). DDP's
        gradients are views into its all-reduce buckets (no second copy of them); with
        ``bf16_grads`` they travel as bf16."""
        net: nn.Module = self.module
        if ddp:
            net = self.ddp = DistributedDataParallel(
                self.module, broadcast_buffers=False, gradient_as_bucket_view=True,
                device_ids=[device.index] if device.type == "cuda" else None)
            if bf16_grads:
                self.ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        self.net = torch.compile(net) if compile else net

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Within it, a backward pass reduces gradients across ranks only if ``enabled`` (the
        last micro-batch of an accumulated step); earlier micro-batches accumulate locally."""
        if enabled:
            yield
        elif self.ddp is not None:
            with self.ddp.no_sync():
                yield
        elif self.fsdp:
            self.module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)
        else:
            yield

    def release_wrappers(self) -> None:
        """Drop the DDP and compiled wrappers. The DDP ``Reducer`` holds the process group from
        C++; it must go before the group is destroyed, so that the group's last reference is a
        Python one, which releases the GIL as gloo joins its threads (see
        :mod:`diffmoe.distributed`)."""
        self.net = self.ddp = None
