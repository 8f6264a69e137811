"""Scale-out pieces of the trainer: FSDP2 sharding, full (unsharded) state dicts for checkpoints,
and gradient synchronisation across micro-batches.

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
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0, on the CPU
FULL_EVERYWHERE = StateDictOptions(full_state_dict=True)  # every rank passes the full tensors


def shard(model: nn.Module) -> nn.Module:
    """FSDP2: one unit per DiT block, then the root (embedders, final layer)."""
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
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


@contextlib.contextmanager
def gradient_sync(ddp: Optional[nn.Module], fsdp_model: Optional[nn.Module],
                  enabled: bool) -> Iterator[None]:
    """Within it, a backward pass reduces gradients across ranks only if ``enabled`` (the last
    micro-batch of an accumulated step); earlier micro-batches accumulate locally."""
    if enabled:
        yield
    elif ddp is not None:
        with ddp.no_sync():
            yield
    elif fsdp_model is not None:
        fsdp_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            fsdp_model.set_requires_gradient_sync(True)
    else:
        yield
