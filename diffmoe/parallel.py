"""Data-parallel training: the model handle the trainer drives (:class:`TrainingModel`: the raw
module, plus the DDP / FSDP2 / compiled wrapper that runs its forward), FSDP2 sharding, full
(unsharded) state dicts for checkpoints, and gradient synchronisation across micro-batches.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each DiT block and then the root module, so
parameters become DTensors split over ranks along dim 0 and each block's weights are gathered
just for its forward and backward. The EMA model is sharded the same way, so its update is a
local lerp of shards. Checkpoints hold full tensors in the same layout as DDP or single-process
checkpoints (optimizer state keyed by parameter index), so a run can be resumed under either
engine, and ``diffmoe sample`` reads them without a process group.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

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
from torch.nn.parallel import DistributedDataParallel

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0, on the CPU
FULL_EVERYWHERE = StateDictOptions(full_state_dict=True)  # every rank passes the full tensors


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shard(model: nn.Module, precision: str = "fp32", reduce_dtype: str = "fp32",
          mesh: Optional[DeviceMesh] = None) -> nn.Module:
    """FSDP2: one unit per DiT block, then the root (embedders, final layer). With ``precision``
    bf16 the parameters are gathered for the forward and backward in bf16 and the gradients
    reduced in ``reduce_dtype``; the sharded parameters and the optimizer stay fp32. ``mesh``:
    the ranks to shard over (default: every rank of the process group)."""
    policy = MixedPrecisionPolicy()
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                      reduce_dtype=DTYPES[reduce_dtype])
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's full state dict on rank 0 (empty elsewhere); collective."""
    return get_model_state_dict(model, options=FULL)


def load_full_model_state(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], None]:
    """A loader of full tensors (present on every rank) into a sharded model."""
    def load(tensors: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(model, tensors, options=FULL_EVERYWHERE)
    return load


def _param_ids(model: nn.Module) -> dict[str, int]:
    # The optimizer was built from model.parameters(): its ids follow this order.
    return {name: i for i, (name, _) in enumerate(model.named_parameters())}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state of a sharded model, gathered to rank 0 and keyed by parameter index
    like ``optimizer.state_dict()`` of an unsharded model; collective."""
    osd = get_optimizer_state_dict(model, optimizer, options=FULL)
    ids = _param_ids(model)
    state = {ids[name]: st for name, st in osd.get("state", {}).items()}
    groups = [dict(g, params=[ids[name] for name in g["params"]])
              for g in osd.get("param_groups", [])]
    return {"state": state, "param_groups": groups}


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
